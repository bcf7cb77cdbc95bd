"""Drift signal: live confidence and entropy against the bundle's reference (pure, time-free).

The reference is what the model shows on its own reference/eval inputs at load time. Live
values are tracked with an EWMA; the signal is the drop in mean confidence and the rise in
mean entropy (in nats), and ``drifting`` when either passes its threshold after
``min_samples`` observations.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DriftConfig:
    alpha: float = 0.02
    conf_drop: float = 0.10
    entropy_rise: float = 0.25
    min_samples: int = 50


class DriftMonitor:
    def __init__(self, ref_confidence: float, ref_entropy: float, cfg: DriftConfig = DriftConfig()) -> None:
        self.ref_conf, self.ref_ent, self.cfg = ref_confidence, ref_entropy, cfg
        self.conf = ref_confidence
        self.ent = ref_entropy
        self.n = 0

    def observe(self, confidence: float, entropy: float) -> None:
        a = self.cfg.alpha if self.n >= 1 / self.cfg.alpha else 1.0 / (self.n + 1)
        self.conf += a * (confidence - self.conf)
        self.ent += a * (entropy - self.ent)
        self.n += 1

    @property
    def score(self) -> float:
        """max of the confidence drop and entropy rise, each relative to its threshold (>= 1: drifting)."""
        return max((self.ref_conf - self.conf) / self.cfg.conf_drop, (self.ent - self.ref_ent) / self.cfg.entropy_rise)

    @property
    def drifting(self) -> bool:
        return self.n >= self.cfg.min_samples and self.score >= 1.0

    def rebase(self) -> None:
        """After adapting, the new normal is the reference."""
        self.ref_conf, self.ref_ent = self.conf, self.ent

    def status(self) -> dict[str, Any]:
        return {"confidence": round(self.conf, 4), "entropy": round(self.ent, 4),
                "ref_confidence": round(self.ref_conf, 4), "ref_entropy": round(self.ref_ent, 4),
                "score": round(self.score, 3), "drifting": self.drifting, "observed": self.n}
