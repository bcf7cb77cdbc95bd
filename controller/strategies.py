"""Federated strategies: they *decide* how to turn updates into the next global head.

Flower's split: a strategy takes plain arrays and returns plain arrays or ``None`` (no new
model); the round runner owns transport, deadlines and persistence. Every strategy works
on deltas (local − global) with their weights (sample counts) and staleness, and keeps
its own state serialisable (``state()``/``load_state()``) so a restarted controller resumes.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from . import aggregate as agg

Head = dict[str, np.ndarray]
Result = tuple[Mapping[str, np.ndarray], int, int]   # (delta, num_samples, staleness)


class Strategy:
    name = "base"
    #: task settings sent to clients (e.g. FedProx's mu)
    task_config: dict[str, Any] = {}

    def combine(self, results: Sequence[Result]) -> dict[str, np.ndarray] | None:
        raise NotImplementedError

    def aggregate_deltas(self, global_head: Mapping[str, np.ndarray], results: Sequence[Result]) -> Head | None:
        if not results:
            return None
        d = self.combine(results)
        if d is None:
            return None
        return self.apply(global_head, d)

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        return {k: (np.asarray(global_head[k], np.float32) + delta[k]).astype(np.float32) for k in global_head}

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        pass


class FedAvg(Strategy):
    """Sample-weighted mean of the updates (McMahan et al.)."""

    name = "fedavg"

    def __init__(self, staleness: str = "sqrt") -> None:
        self.staleness = staleness

    def weights(self, results: Sequence[Result]) -> list[float]:
        return [n * agg.staleness_weight(s, self.staleness) for _, n, s in results]

    def combine(self, results: Sequence[Result]) -> dict[str, np.ndarray]:
        return agg.fast_weighted_average([r[0] for r in results], self.weights(results))


class FedProx(FedAvg):
    """FedAvg aggregation; clients add mu/2 ||w - w_global||^2 to their loss (Li et al.)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, staleness: str = "sqrt") -> None:
        super().__init__(staleness)
        if mu < 0:
            raise ValueError("mu must be >= 0")
        self.mu = mu
        self.task_config = {"prox_mu": mu}


class FedOpt(FedAvg):
    """Server optimizers on the pseudo-gradient (the averaged delta), Reddi et al. 2021."""

    def __init__(self, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 staleness: str = "sqrt") -> None:
        super().__init__(staleness)
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def aggregate_deltas(self, global_head, results):
        if not results:
            return None
        d = self.combine(results)
        out = {}
        for k, g in global_head.items():
            m = self.m.get(k, np.zeros_like(d[k]))
            v = self.v.get(k, np.full_like(d[k], self.tau ** 2))
            m = self.beta1 * m + (1 - self.beta1) * d[k]
            v = self.second_moment(v, d[k])
            self.m[k], self.v[k] = m.astype(np.float32), v.astype(np.float32)
            out[k] = (np.asarray(g, np.float32) + self.eta * m / (np.sqrt(v) + self.tau)).astype(np.float32)
        return out

    def state(self) -> dict[str, Any]:
        return {"m": {k: v.tolist() for k, v in self.m.items()}, "v": {k: v.tolist() for k, v in self.v.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.m = {k: np.asarray(v, np.float32) for k, v in (state.get("m") or {}).items()}
        self.v = {k: np.asarray(v, np.float32) for k, v in (state.get("v") or {}).items()}


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v, d):
        return self.beta2 * v + (1 - self.beta2) * d * d


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v, d):
        d2 = d * d
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


class Median(Strategy):
    """Coordinate-wise median (robust to a minority of arbitrary updates)."""

    name = "median"

    def combine(self, results):
        return agg.coordinate_median([r[0] for r in results])


class TrimmedMean(Strategy):
    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = beta

    def combine(self, results):
        return agg.trimmed_mean([r[0] for r in results], self.beta)


class Krum(Strategy):
    """Multi-Krum (Blanchard et al.): average the m updates closest to their neighbours; m = 1 is Krum."""

    name = "krum"

    def __init__(self, f: int = 1, m: int = 1) -> None:
        self.f, self.m = f, m
        self.last_chosen: list[int] = []

    def combine(self, results):
        ups = [r[0] for r in results]
        if len(ups) <= self.f + 2:  # too few to judge: fall back to the median
            return agg.coordinate_median(ups)
        avg, self.last_chosen = agg.multi_krum(ups, [r[1] for r in results], self.f, min(self.m, len(ups)))
        return avg


class MultiKrum(Krum):
    name = "multikrum"

    def __init__(self, f: int = 1, m: int = 3) -> None:
        super().__init__(f, m)


class FedBuff(FedAvg):
    """Buffered asynchronous aggregation (Nguyen et al.): staleness-weighted mean, server lr eta."""

    name = "fedbuff"

    def __init__(self, eta: float = 1.0, staleness: str = "sqrt") -> None:
        super().__init__(staleness)
        self.eta = eta

    def combine(self, results):
        d = super().combine(results)
        return {k: (self.eta * v).astype(np.float32) for k, v in d.items()}


STRATEGIES: dict[str, type[Strategy]] = {c.name: c for c in (FedAvg, FedProx, FedAdam, FedYogi, Median, TrimmedMean,
                                                               Krum, MultiKrum, FedBuff)}


def make(name: str, **params: Any) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for {name}: {exc}") from None
