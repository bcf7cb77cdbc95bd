"""On-device learning of the head: trainer, feature replay buffer, labels-later, drift signal,
adoption/trigger policy, checkpoints, and the ``Learner`` that ties them together.

Public API:

* ``Learner``/``LearnConfig``/``CycleResult`` (learner) — the orchestrator the agent drives;
* ``HeadTrainer``/``TrainConfig``/``TrainReport``/``loss_and_grads``/``accuracy`` (trainer);
* ``FeatureBuffer`` (replay), ``PendingLabels`` (pending), ``DriftMonitor``/``DriftConfig`` (drift);
* ``decide_adoption``/``Decision``/``trigger_reason``/``TriggerState`` (policy);
* ``write_checkpoint``/``read_checkpoint``/``CheckpointError`` (checkpoint).
"""
from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint  # noqa: F401
from .drift import DriftConfig, DriftMonitor  # noqa: F401
from .learner import CycleResult, LearnConfig, Learner  # noqa: F401
from .pending import PendingLabels  # noqa: F401
from .policy import Decision, TriggerState, decide_adoption, trigger_reason  # noqa: F401
from .replay import FeatureBuffer  # noqa: F401
from .trainer import HeadTrainer, TrainConfig, TrainReport, accuracy, loss_and_grads  # noqa: F401
