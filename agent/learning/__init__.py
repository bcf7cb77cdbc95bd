"""On-device learning of the head: trainer, feature replay buffer, drift signal, learner.

Public API: ``Learner``/``LearnConfig`` (learner), ``HeadTrainer``/``TrainConfig``/``loss_and_grads``
(trainer), ``FeatureBuffer`` (replay), ``DriftMonitor`` (drift).
"""
from .learner import CycleResult, LearnConfig, Learner  # noqa: F401
from .trainer import HeadTrainer, TrainConfig, loss_and_grads  # noqa: F401
