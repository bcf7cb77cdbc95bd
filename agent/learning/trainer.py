"""A numpy trainer for the head: softmax cross-entropy, SGD with momentum or Adam, weight
decay, and FedProx's proximal term μ/2‖θ − θ_ref‖² toward a reference head.

``loss_and_grads`` is a pure function (checked against finite differences in the tests);
``HeadTrainer`` keeps optimizer state and never touches the serving head: it trains a copy.
"""
from __future__ import annotations

from dataclasses import dataclass
import time
from typing import Mapping

import numpy as np

Head = dict[str, np.ndarray]


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"       # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    prox_mu: float = 0.0
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be sgd or adam, got {self.optimizer!r}")
        if not (0 < self.lr < 10):
            raise ValueError("lr must be in (0, 10)")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if not (0 <= self.momentum < 1):
            raise ValueError("momentum must be in [0, 1)")
        if self.weight_decay < 0 or self.prox_mu < 0:
            raise ValueError("weight_decay and prox_mu must be >= 0")


@dataclass(frozen=True)
class TrainReport:
    loss: float
    steps: int
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0


def n_layers(head: Mapping[str, np.ndarray]) -> int:
    return sum(1 for k in head if k.endswith(".weight"))


def loss_and_grads(head: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, weight_decay: float = 0.0,
                   prox_mu: float = 0.0, ref: Mapping[str, np.ndarray] | None = None) -> tuple[float, Head]:
    """Mean softmax cross-entropy (+ L2 on weights, + proximal term) and its exact gradients."""
    n = n_layers(head)
    acts = [x]
    h = x
    for i in range(n):
        h = h @ head[f"dense{i}.weight"] + head[f"dense{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0)
        acts.append(h)
    z = h - h.max(axis=1, keepdims=True)
    e = np.exp(z)
    p = e / e.sum(axis=1, keepdims=True)
    m = len(y)
    loss = float(-np.log(p[np.arange(m), y] + 1e-12).mean())
    g = p
    g[np.arange(m), y] -= 1
    g /= m
    grads: Head = {}
    for i in range(n - 1, -1, -1):
        w = head[f"dense{i}.weight"]
        grads[f"dense{i}.weight"] = acts[i].T @ g
        grads[f"dense{i}.bias"] = g.sum(axis=0)
        if i > 0:
            g = (g @ w.T) * (acts[i] > 0)
    if weight_decay:
        for i in range(n):
            w = head[f"dense{i}.weight"]
            loss += 0.5 * weight_decay * float(np.sum(w * w))
            grads[f"dense{i}.weight"] = grads[f"dense{i}.weight"] + weight_decay * w
    if prox_mu and ref is not None:
        for k, v in head.items():
            d = v - ref[k]
            loss += 0.5 * prox_mu * float(np.sum(d * d))
            grads[k] = grads[k] + prox_mu * d
    return loss, grads


class HeadTrainer:
    def __init__(self, head: Mapping[str, np.ndarray], cfg: TrainConfig, ref: Mapping[str, np.ndarray] | None = None,
                 correction: Mapping[str, np.ndarray] | None = None, frozen: "set[str] | frozenset[str]" = frozenset()):
        """``correction``: added to every gradient (SCAFFOLD's c − cᵢ). ``frozen``: tensors never
        stepped (the layers a bundle does not federate)."""
        self.cfg = cfg
        self.correction = {k: np.asarray(v, np.float32) for k, v in (correction or {}).items()}
        self.frozen = frozenset(frozen)
        self.params: Head = {k: np.array(v, dtype=np.float32, copy=True) for k, v in head.items()}
        self.ref = {k: np.asarray(v, np.float32) for k, v in (ref or head).items()} if cfg.prox_mu else None
        self.rng = np.random.default_rng(cfg.seed)
        self._m = {k: np.zeros_like(v) for k, v in self.params.items()}
        self._v = {k: np.zeros_like(v) for k, v in self.params.items()} if cfg.optimizer == "adam" else None
        self._t = 0

    def head(self) -> Head:
        return {k: v.copy() for k, v in self.params.items()}

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        c = self.cfg
        with np.errstate(over="ignore", invalid="ignore"):  # a blow-up is caught just below, by name
            loss, grads = loss_and_grads(self.params, x, y, c.weight_decay, c.prox_mu, self.ref)
        if not np.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss}")
        self._t += 1
        for k, g in grads.items():
            if k in self.frozen:
                continue
            if k in self.correction:
                g = g + self.correction[k]
            if c.optimizer == "sgd":
                m = self._m[k]
                m *= c.momentum
                m += g
                self.params[k] -= c.lr * m
            else:
                m, v = self._m[k], self._v[k]  # type: ignore[index]
                m *= 0.9
                m += 0.1 * g
                v *= 0.999
                v += 0.001 * g * g
                self.params[k] -= c.lr * (m / (1 - 0.9 ** self._t)) / (np.sqrt(v / (1 - 0.999 ** self._t)) + 1e-8)
        return loss

    def train(self, x: np.ndarray, y: np.ndarray, steps: int | None = None, budget_s: float | None = None,
              yield_every: int = 1, cpu_fraction: float = 1.0, *, epochs: float | None = None) -> TrainReport:
        """Minibatch steps (sampled with replacement) until ``steps`` — or ``epochs`` passes over
        the data, ceil(epochs * n / batch_size) steps — or the time budget, whichever comes first.

        ``cpu_fraction`` < 1 paces the loop (sleeping in proportion to each step's time), so
        inference sharing the interpreter keeps its latency while training runs."""
        n = len(x)
        if n == 0 or len(y) != n:
            raise ValueError(f"need as many labels as feature rows and at least one ({n} rows, {len(y)} labels)")
        bs = min(self.cfg.batch_size, n)
        if epochs is not None:
            if steps is not None:
                raise ValueError("give steps or epochs, not both")
            steps = max(1, int(np.ceil(epochs * n / bs)))
        if steps is None:
            raise ValueError("give steps or epochs")
        t0 = time.perf_counter()
        pause = (1.0 - cpu_fraction) / cpu_fraction if 0 < cpu_fraction < 1 else 0.0
        losses = []
        done = 0
        for s in range(steps):
            ts = time.perf_counter()
            idx = self.rng.integers(0, n, bs)
            losses.append(self.step(x[idx], y[idx]))
            done += 1
            if pause:
                time.sleep((time.perf_counter() - ts) * pause)
            elif yield_every and s % yield_every == 0:
                time.sleep(0)  # let the inference thread have the GIL between steps
            if budget_s is not None and time.perf_counter() - t0 >= budget_s:
                break
        secs = time.perf_counter() - t0
        tail = losses[-max(1, len(losses) // 4):]
        return TrainReport(float(np.mean(tail)) if tail else float("nan"), done, done * bs, secs)


def logits(head: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The head's forward pass: dense layers with ReLU between them, logits out."""
    h = x
    n = n_layers(head)
    for i in range(n):
        h = h @ head[f"dense{i}.weight"] + head[f"dense{i}.bias"]
        if i < n - 1:
            h = np.maximum(h, 0)
    return h


def accuracy(head: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    if len(y) == 0:
        return float("nan")
    return float((logits(head, x).argmax(1) == y).mean())
