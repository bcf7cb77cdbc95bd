"""Differential privacy for federated rounds (DP-FedAvg style) and its accounting.

* Clients clip their whole update to L2 norm ``clip`` (``agent.federated.clip_delta``).
* The server averages the clipped updates with *uniform* weights and adds Gaussian noise
  N(0, (z · clip / m)²) to every coordinate, m = number of updates — so each client's
  contribution to the average has sensitivity clip/m and the mechanism is the Gaussian
  mechanism with noise multiplier z.
* Accounting: Rényi DP of the Gaussian mechanism, ε_RDP(α) = α / (2 z²) per round
  (Mironov 2017, Prop. 7), composed additively over rounds, converted to (ε, δ) with
  ε = min_α [ε_RDP(α) + ln(1/δ) / (α − 1)] (Mironov 2017, Prop. 3). Client sampling would
  amplify privacy further; we do not claim that amplification, so the reported ε is an
  upper bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

ORDERS = tuple([1.25, 1.5, 1.75, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 48, 64, 96, 128, 256])


def gaussian_rdp(z: float, alpha: float) -> float:
    return alpha / (2 * z * z)


def epsilon(z: float, rounds: int, delta: float, orders: Sequence[float] = ORDERS) -> tuple[float, float]:
    """(ε, best order) after ``rounds`` Gaussian mechanisms with noise multiplier ``z``."""
    if z <= 0:
        return math.inf, math.nan
    best = (math.inf, math.nan)
    for a in orders:
        eps = rounds * gaussian_rdp(z, a) + math.log(1 / delta) / (a - 1)
        if eps < best[0]:
            best = (eps, a)
    return best


@dataclass(frozen=True)
class DPConfig:
    clip: float = 1.0
    noise: float = 1.0        # noise multiplier z
    delta: float = 1e-5

    @classmethod
    def from_dict(cls, d: Mapping[str, float] | None) -> "DPConfig | None":
        if not d:
            return None
        c = cls(float(d.get("clip", 1.0)), float(d.get("noise", 1.0)), float(d.get("delta", 1e-5)))
        if c.clip <= 0 or c.noise < 0 or not (0 < c.delta < 1):
            raise ValueError("dp needs clip > 0, noise >= 0, 0 < delta < 1")
        return c


def clip_update(u: Mapping[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in u.values()))
    s = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, np.float32) * s).astype(np.float32) for k, v in u.items()}


def private_mean(updates: Sequence[Mapping[str, np.ndarray]], cfg: DPConfig,
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Uniform mean of (re-)clipped updates plus calibrated Gaussian noise."""
    m = len(updates)
    clipped = [clip_update(u, cfg.clip) for u in updates]
    sigma = cfg.noise * cfg.clip / m
    return {k: (sum(c[k] for c in clipped) / m + rng.normal(0, sigma, np.shape(clipped[0][k]))).astype(np.float32)
            for k in clipped[0]}
