"""Per-board personalization, FedPer-style (Arivazhagan et al. 2019): the fleet federates the body,
each board keeps its own last layer, fine-tuned on its own labelled data from the global one.

The quality gate (``choose``) compares the personal head with the global head on the board's
held-out slice and serves the better one (ties: global — the fleet's model is the default);
telemetry reports both accuracies. The personal layer lives in ``personal.npz`` (atomic rename,
tied to the bundle id and a checksum): a file for another bundle, of other shapes or corrupt is
refused with the reason, and the board personalizes afresh from the next global head.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np

from . import boundstate
from .trainer import HeadTrainer, TrainConfig, accuracy

Head = dict[str, np.ndarray]
FILE = "personal.npz"


class PersonalHeadError(ValueError):
    """A stored personal layer that cannot be used; the message says why."""


def last_layer(head: Mapping[str, np.ndarray]) -> str:
    return f"dense{max(int(k[5:k.index('.')]) for k in head)}"


@dataclass(frozen=True)
class Choice:
    serve: str                  # "personal" | "global"
    global_acc: float
    personal_acc: float


def choose(global_acc: float, personal_acc: float) -> Choice:
    """Serve the personal head only when it is strictly better on the holdout."""
    ok = not np.isnan(personal_acc) and (np.isnan(global_acc) or personal_acc > global_acc)
    return Choice("personal" if ok else "global", global_acc, personal_acc)


def fine_tune(global_head: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, steps: int,
              cfg: TrainConfig) -> Head:
    """The global head with its last layer trained on this board's data (the body frozen)."""
    last = last_layer(global_head)
    tr = HeadTrainer(global_head, cfg, frozen={k for k in global_head if not k.startswith(last + ".")})
    tr.train(x, y, steps, yield_every=0)
    return tr.head()


def personalize(global_head: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, hx: np.ndarray,
                hy: np.ndarray, steps: int, cfg: TrainConfig) -> tuple[Head, Choice]:
    """(the head to serve, the gate's choice with both holdout accuracies)."""
    mine = fine_tune(global_head, x, y, steps, cfg)
    c = choose(accuracy(global_head, hx, hy), accuracy(mine, hx, hy))
    return (mine if c.serve == "personal" else {k: np.asarray(v, np.float32) for k, v in global_head.items()}), c


class PersonalStore:
    """The board's personal last layer for one bundle."""

    def __init__(self, directory: str | Path, bundle_id: str) -> None:
        self.path = Path(directory) / FILE
        self.bundle_id = bundle_id

    def save(self, layer: Mapping[str, np.ndarray]) -> None:
        boundstate.write(self.path, layer, self.bundle_id, "p/")

    def load(self, head: Mapping[str, np.ndarray]) -> Head | None:
        """The stored personal layer fitted to ``head`` (None when there is none); raises
        ``PersonalHeadError`` naming why a stored one is refused."""
        if not self.path.exists():
            return None
        try:
            arrays = boundstate.read(self.path, self.bundle_id, "p/")
        except boundstate.BoundStateError as exc:
            raise PersonalHeadError(str(exc)) from None
        last = last_layer(head)
        want = {k: tuple(np.shape(v)) for k, v in head.items() if k.startswith(last + ".")}
        if {k: tuple(v.shape) for k, v in arrays.items()} != want:
            raise PersonalHeadError(f"{FILE}: tensors {sorted(arrays)} do not fit the head's last layer {last}")
        return arrays
