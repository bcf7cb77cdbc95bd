"""When to train, and whether a trained candidate head may replace the serving one.

Both are pure decisions over numbers the learner already has, so they are tested without
training anything:

* ``decide_adoption``: a candidate is adopted only when it is *not worse* than the current
  head on the held-out slice (accuracy, with an optional tolerance ``margin``), the slice is
  large enough to mean something, and the candidate is finite. Ties go to the candidate
  (it has seen more data); a candidate that is worse is never adopted, whatever its train loss.
* ``trigger_reason``: train on command, every N labelled samples, or when drift is signalled
  — but never before there is enough data, while a cycle is running, or beyond the CPU share
  the board allows for learning.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Mapping

import numpy as np

TRIGGERS = ("every_n", "drift", "command")


@dataclass(frozen=True)
class Decision:
    adopt: bool
    reason: str


def head_is_finite(head: Mapping[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(v).all()) for v in head.values())


def decide_adoption(acc_before: float, acc_after: float, n_holdout: int, *, min_holdout: int = 10,
                    margin: float = 0.0, finite: bool = True) -> Decision:
    """Adopt iff the candidate is finite, ``n_holdout >= min_holdout`` and
    ``acc_after >= acc_before - margin`` (accuracies in [0, 1])."""
    if not finite:
        return Decision(False, "candidate head has NaN/inf")
    if n_holdout < min_holdout:
        return Decision(False, f"holdout has {n_holdout} samples, need {min_holdout}")
    if math.isnan(acc_after) or math.isnan(acc_before):
        return Decision(False, "holdout accuracy undefined")
    if acc_after + 1e-12 < acc_before - margin:
        return Decision(False, f"candidate holdout accuracy {acc_after:.3f} < current {acc_before:.3f}"
                               + (f" - margin {margin:g}" if margin else ""))
    return Decision(True, f"holdout accuracy {acc_before:.3f} → {acc_after:.3f} on {n_holdout} samples")


@dataclass(frozen=True)
class TriggerState:
    """What the trigger looks at, gathered by the learner at one instant."""

    enabled: bool
    busy: bool
    train_size: int
    holdout_size: int
    since_cycle: int              # labelled samples since the last cycle
    requested: bool               # a learn.now command is waiting
    drifting: bool
    drift_score: float
    cpu_share: float              # training seconds / wall seconds so far


def trigger_reason(s: TriggerState, *, trigger: str = "every_n", every_n: int = 50, min_train: int = 20,
                   min_holdout: int = 10, cpu_fraction: float = 0.25) -> str | None:
    """The reason to start a cycle now, or None. A command overrides the configured trigger
    but not the data and CPU limits (training on too little data can only be rejected)."""
    if trigger not in TRIGGERS:
        raise ValueError(f"trigger must be one of {', '.join(TRIGGERS)}, got {trigger!r}")
    if not s.enabled or s.busy:
        return None
    if s.train_size < min_train or s.holdout_size < min_holdout:
        return None
    if s.cpu_share > cpu_fraction:
        return None
    if s.requested:
        return "command"
    if trigger == "every_n" and s.since_cycle >= every_n:
        return f"{s.since_cycle} new labelled samples"
    if trigger == "drift" and s.drifting and s.since_cycle >= min_train:
        return f"drift score {s.drift_score:.2f}"
    return None
