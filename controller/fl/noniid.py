"""Strategies for non-IID fleets that change the *server* step: FedAvgM and SCAFFOLD.

* FedAvgM — Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data distribution"
  (and Cheng et al. 2023, "Momentum benefits non-IID federated learning simply and provably"):
  server momentum on the averaged delta Δ, v ← β v + Δ; w ← w + η v. Flower's ``FedAvgM``
  writes the same step with the pseudo-gradient −Δ.
* SCAFFOLD — Karimireddy et al. 2020, Algorithm 1 with option II. The server keeps a control
  variate c per federated tensor; the task carries it (``task_tensors``: ``cv.<name>``); the
  client corrects every local gradient by (c − cᵢ), then sends its model delta Δyᵢ *and* its
  control-variate delta Δcᵢ (``cv.<name>`` tensors in the same update). The server steps
  x ← x + η_g · mean(Δy) and c ← c + |S|/N · mean(Δc), N the fleet size (``num_clients``, or
  the number of distinct devices seen so far when 0). Each client's own cᵢ lives on the device
  (``agent.learning.scaffold``), across rounds and restarts.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from . import aggregate as agg
from .strategies import FedAvg, FitResult, Head

CV = "cv."   # tensor-name prefix of control variates on the wire


class FedAvgM(FedAvg):
    """Sample-weighted mean, then server momentum: v ← β v + Δ;  w ← w + η v."""

    name = "fedavgm"

    def __init__(self, eta: float = 1.0, beta: float = 0.9, staleness: str = "sqrt") -> None:
        super().__init__(staleness)
        if eta <= 0 or not 0 <= beta < 1:
            raise ValueError("FedAvgM needs eta > 0 and 0 <= beta < 1")
        self.eta, self.beta = eta, beta
        self.v: dict[str, np.ndarray] = {}

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        out = {}
        for k, g in global_head.items():
            d = np.asarray(delta[k], np.float64)
            v = np.asarray(self.v.get(k, np.zeros_like(d)), np.float64)
            if v.shape != d.shape:   # a new head shape: restart the momentum
                v = np.zeros_like(d)
            v = self.beta * v + d
            self.v[k] = v.astype(np.float32)
            out[k] = (np.asarray(g, np.float64) + self.eta * v).astype(np.float32)
        return out

    def dp_sensitivity(self, results: Sequence[FitResult]) -> float:
        return self.eta * super().dp_sensitivity(results)

    def to_state(self) -> dict[str, Any]:
        return {"v": {k: v.tolist() for k, v in self.v.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.v = {k: np.asarray(v, np.float32) for k, v in (state.get("v") or {}).items()}


class Scaffold(FedAvg):
    """SCAFFOLD's server (option II): uniform means of Δy and Δc over the round's clients."""

    name = "scaffold"

    def __init__(self, eta: float = 1.0, num_clients: int = 0) -> None:
        super().__init__("constant")
        if eta <= 0 or not isinstance(num_clients, int) or num_clients < 0:
            raise ValueError("SCAFFOLD needs eta > 0 and num_clients >= 0 (0: the devices seen so far)")
        self.eta, self.num_clients = eta, num_clients
        self.c: dict[str, np.ndarray] = {}
        self.seen: set[str] = set()
        self.task_config = {"scaffold": True}

    # -- what travels ----------------------------------------------------------------------
    def control(self, global_head: Mapping[str, np.ndarray]) -> Head:
        """The server control variate c (zeros until the first round aggregated)."""
        return {k: (self.c[k] if k in self.c and self.c[k].shape == np.shape(v)
                    else np.zeros(np.shape(v), np.float32)) for k, v in global_head.items()}

    def task_tensors(self, global_head: Mapping[str, np.ndarray]) -> Head:
        return {**{k: np.asarray(v, np.float32) for k, v in global_head.items()},
                **{CV + k: v for k, v in self.control(global_head).items()}}

    def expected_update(self, global_head: Mapping[str, np.ndarray]) -> Head:
        return self.task_tensors(global_head)

    # -- decide ----------------------------------------------------------------------------
    def combine(self, results: Sequence[FitResult]) -> dict[str, np.ndarray]:
        ys = [{k: v for k, v in r.update.items() if not k.startswith(CV)} for r in results]
        cs = [{k[len(CV):]: v for k, v in r.update.items() if k.startswith(CV)} for r in results]
        if any(set(c) != set(y) for c, y in zip(cs, ys)):
            raise ValueError("a SCAFFOLD update must carry a control-variate delta for every tensor")
        ones = [1.0] * len(results)
        dy = agg.weighted_average(ys, ones)
        dc = agg.weighted_average(cs, ones)
        self.seen.update(r.client_id for r in results if r.client_id)
        n_total = self.num_clients or max(len(self.seen), len(results))
        frac = min(1.0, len(results) / n_total)
        for k, v in dc.items():
            old = self.c.get(k)
            base = old.astype(np.float64) if old is not None and old.shape == v.shape else np.zeros(v.shape)
            self.c[k] = (base + frac * v.astype(np.float64)).astype(np.float32)
        return {k: (self.eta * v.astype(np.float64)).astype(np.float32) for k, v in dy.items()}

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        return {k: (np.asarray(global_head[k], np.float32) + delta[k]).astype(np.float32)
                for k in global_head if not k.startswith(CV)}

    def dp_sensitivity(self, results: Sequence[FitResult]) -> float:
        return self.eta / max(1, len(results))

    # -- state -----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {"c": {k: v.tolist() for k, v in self.c.items()}, "seen": sorted(self.seen)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.c = {k: np.asarray(v, np.float32) for k, v in (state.get("c") or {}).items()}
        self.seen = set(state.get("seen") or ())
