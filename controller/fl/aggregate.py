"""Aggregation maths: plain numpy over lists of updates (dict name → array). Never mutates inputs.

An update is a *delta* (local head − global head). Weights are sample counts times a
staleness factor. All functions are pure and unit-tested against hand-computed cases.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

Arrays = Mapping[str, np.ndarray]


def check_updates(updates: Sequence[Arrays]) -> None:
    """Every update has the same tensor names and shapes (else numpy would broadcast silently)."""
    if not updates:
        raise ValueError("no updates to aggregate")
    ref = {k: np.shape(v) for k, v in updates[0].items()}
    for i, u in enumerate(updates[1:], 1):
        if {k: np.shape(v) for k, v in u.items()} != ref:
            raise ValueError(f"update {i} has tensors {sorted((k, np.shape(v)) for k, v in u.items())}, "
                             f"update 0 has {sorted(ref.items())}")


def staleness_weight(s: int, kind: str = "sqrt") -> float:
    """FedBuff-style discount of an update computed on a version ``s`` steps old."""
    if s < 0:
        raise ValueError("staleness must be >= 0")
    if kind == "sqrt":
        return 1.0 / float(np.sqrt(1.0 + s))
    if kind == "constant":
        return 1.0
    if kind == "linear":
        return 1.0 / (1.0 + s)
    raise ValueError(f"unknown staleness weighting {kind!r}")


def weighted_average(updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Σ wᵢ uᵢ / Σ wᵢ, accumulated in float64."""
    check_updates(updates)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per update, not all zero")
    w = w / w.sum()
    out = {}
    for k in updates[0]:
        stack = np.stack([np.asarray(u[k], np.float64) for u in updates])
        out[k] = np.tensordot(w, stack, axes=1).astype(np.float32)
    return out


def fast_weighted_average(updates: Sequence[Arrays], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """``weighted_average`` for large fleets: float32 multiply-accumulate in place, one cache-sized
    scratch buffer per tensor, so each update is read from memory once and nothing is stacked."""
    check_updates(updates)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (len(updates),) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per update, not all zero")
    w32 = (w / w.sum()).astype(np.float32)
    out = {}
    for k in updates[0]:
        acc = np.zeros(np.shape(updates[0][k]), np.float32)
        tmp = np.empty_like(acc)
        for u, wi in zip(updates, w32):
            np.multiply(u[k], wi, out=tmp)
            np.add(acc, tmp, out=acc)
        out[k] = acc
    return out


def coordinate_median(updates: Sequence[Arrays]) -> dict[str, np.ndarray]:
    """Per coordinate, the median (the mean of the middle two for an even count)."""
    check_updates(updates)
    return {k: np.median(np.stack([u[k] for u in updates]), axis=0).astype(np.float32) for k in updates[0]}


def trimmed_mean(updates: Sequence[Arrays], beta: float) -> dict[str, np.ndarray]:
    """Per coordinate, drop the ``floor(beta * n)`` largest and smallest values, average the rest."""
    check_updates(updates)
    n = len(updates)
    t = int(np.floor(beta * n))
    if not 0 <= beta < 0.5 or n - 2 * t < 1:
        raise ValueError(f"trim fraction {beta} leaves nothing of {n} updates")
    out = {}
    for k in updates[0]:
        s = np.sort(np.stack([u[k] for u in updates]), axis=0)
        out[k] = s[t:n - t].mean(axis=0).astype(np.float32)
    return out


def flatten(u: Arrays) -> np.ndarray:
    return np.concatenate([np.asarray(u[k], np.float64).reshape(-1) for k in sorted(u)])


def krum_scores(updates: Sequence[Arrays], f: int) -> np.ndarray:
    """Krum score of each update: sum of squared distances to its n - f - 2 nearest neighbours."""
    check_updates(updates)
    n = len(updates)
    m = n - f - 2
    if m < 1:
        raise ValueError(f"Krum needs n > f + 2 (n={n}, f={f})")
    x = np.stack([flatten(u) for u in updates])
    sq = (x * x).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0)
    np.fill_diagonal(d, np.inf)
    return np.sort(d, axis=1)[:, :m].sum(1)


def multi_krum(updates: Sequence[Arrays], weights: Sequence[float], f: int, m: int) -> tuple[dict[str, np.ndarray], list[int]]:
    """Average (weighted) of the ``m`` updates with the lowest Krum scores; m = 1 is Krum.
    Returns the average and the indices chosen (lowest score first, ties by position)."""
    if not 1 <= m <= len(updates):
        raise ValueError(f"m must be in 1..{len(updates)}, got {m}")
    scores = krum_scores(updates, f)
    chosen = [int(i) for i in np.argsort(scores, kind="stable")[:m]]
    return weighted_average([updates[i] for i in chosen], [weights[i] for i in chosen]), chosen
