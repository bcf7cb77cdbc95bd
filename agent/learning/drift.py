"""Drift signal: live confidence and entropy against the bundle's reference (pure, time-free).

The reference is what the model shows on its own reference/eval inputs at load time. Two
signals, both updated per observation with no clock:

* **means** — EWMAs of confidence and entropy (nats); the score is the larger of the drop in
  mean confidence over ``conf_drop`` and the rise in mean entropy over ``entropy_rise``.
* **distribution** (when the reference *confidences* are given) — a histogram of live
  confidences with exponentially decayed counts (effective window ≈ 1/alpha observations),
  compared with the reference histogram by the population stability index
  PSI = Σ (p_live − p_ref) · ln(p_live / p_ref) (bins smoothed by ``eps``) and by a KS-style
  statistic, the largest gap between the two binned CDFs. PSI ≥ 0.25 is the usual rule of
  thumb for a significant shift; it catches a change of *shape* that leaves the mean alone
  (e.g. a model that became bimodal: sure of some inputs, lost on others).

``drifting`` once ``min_samples`` observations are in and either score reaches 1 (the means
score) or PSI reaches ``psi_threshold``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class DriftConfig:
    alpha: float = 0.02
    conf_drop: float = 0.10
    entropy_rise: float = 0.25
    min_samples: int = 50
    bins: int = 10
    psi_threshold: float = 0.25
    eps: float = 1e-3             # smoothing per bin, so an empty bin does not make PSI infinite

    def __post_init__(self) -> None:
        if not 0 < self.alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        if self.conf_drop <= 0 or self.entropy_rise <= 0 or self.psi_threshold <= 0:
            raise ValueError("drift thresholds must be > 0")
        if self.bins < 2:
            raise ValueError("bins must be >= 2")


def histogram(values: Sequence[float] | np.ndarray, bins: int) -> np.ndarray:
    """Normalised histogram of values in [0, 1] over ``bins`` equal bins (1.0 in the last bin)."""
    v = np.clip(np.asarray(values, np.float64).reshape(-1), 0.0, 1.0)
    if v.size == 0:
        raise ValueError("no reference values")
    idx = np.minimum((v * bins).astype(np.int64), bins - 1)
    return np.bincount(idx, minlength=bins) / v.size


def psi(p: np.ndarray, q: np.ndarray, eps: float = 1e-3) -> float:
    """Population stability index of distribution ``p`` against reference ``q`` (same bins)."""
    p = (np.asarray(p, np.float64) + eps)
    q = (np.asarray(q, np.float64) + eps)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * np.log(p / q)))


def ks(p: np.ndarray, q: np.ndarray) -> float:
    """Largest absolute gap between the CDFs of two binned distributions."""
    return float(np.max(np.abs(np.cumsum(p) / np.sum(p) - np.cumsum(q) / np.sum(q))))


class DriftMonitor:
    def __init__(self, ref_confidence: float, ref_entropy: float, cfg: DriftConfig = DriftConfig(),
                 ref_confidences: Sequence[float] | np.ndarray | None = None) -> None:
        self.ref_conf, self.ref_ent, self.cfg = float(ref_confidence), float(ref_entropy), cfg
        self.conf = self.ref_conf
        self.ent = self.ref_ent
        self.n = 0
        self.ref_hist = None if ref_confidences is None else histogram(ref_confidences, cfg.bins)
        self.live_hist = np.zeros(cfg.bins)

    def _rate(self) -> float:
        """Plain running mean until 1/alpha observations, then the EWMA (no start-up bias)."""
        return self.cfg.alpha if self.n >= 1 / self.cfg.alpha else 1.0 / (self.n + 1)

    def observe(self, confidence: float, entropy: float) -> None:
        if not (np.isfinite(confidence) and np.isfinite(entropy)):
            return  # a broken prediction is the inference engine's business, not a drift signal
        a = self._rate()
        self.conf += a * (confidence - self.conf)
        self.ent += a * (entropy - self.ent)
        b = min(int(min(max(confidence, 0.0), 1.0) * self.cfg.bins), self.cfg.bins - 1)
        self.live_hist *= 1 - a
        self.live_hist[b] += a
        self.n += 1

    @property
    def score(self) -> float:
        """max of the confidence drop and entropy rise, each relative to its threshold (>= 1: drifting)."""
        return max((self.ref_conf - self.conf) / self.cfg.conf_drop, (self.ent - self.ref_ent) / self.cfg.entropy_rise)

    @property
    def psi(self) -> float | None:
        if self.ref_hist is None or self.n == 0:
            return None
        return psi(self.live_hist, self.ref_hist, self.cfg.eps)

    @property
    def ks(self) -> float | None:
        if self.ref_hist is None or self.n == 0:
            return None
        return ks(self.live_hist, self.ref_hist)

    @property
    def drifting(self) -> bool:
        if self.n < self.cfg.min_samples:
            return False
        p = self.psi
        return self.score >= 1.0 or (p is not None and p >= self.cfg.psi_threshold)

    def rebase(self) -> None:
        """After adapting, the new normal is the reference."""
        self.ref_conf, self.ref_ent = self.conf, self.ent
        if self.ref_hist is not None and self.live_hist.sum() > 0:
            self.ref_hist = self.live_hist / self.live_hist.sum()

    def status(self) -> dict[str, Any]:
        p, k = self.psi, self.ks
        return {"confidence": round(self.conf, 4), "entropy": round(self.ent, 4),
                "ref_confidence": round(self.ref_conf, 4), "ref_entropy": round(self.ref_ent, 4),
                "score": round(self.score, 3), "psi": None if p is None else round(p, 4),
                "ks": None if k is None else round(k, 4), "drifting": self.drifting, "observed": self.n}
