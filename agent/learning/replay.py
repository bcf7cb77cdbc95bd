"""A bounded replay buffer of backbone *features* (never raw inputs), capped in bytes.

Every ``holdout_every``-th labelled sample goes to a held-out slice that training never
sees; candidate heads are judged on it. Policies: ``reservoir`` (uniform over everything
seen) or ``class_balanced`` (a reservoir per class, so a rare class is not crowded out).
Thread-safe: the loop thread adds, the training thread snapshots.
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np


class _Reservoir:
    def __init__(self, capacity: int, dim: int, rng: np.random.Generator) -> None:
        self.cap = max(1, capacity)
        self.x = np.zeros((self.cap, dim), np.float32)
        self.y = np.zeros(self.cap, np.int64)
        self.n = 0
        self.seen = 0
        self.rng = rng

    def add(self, f: np.ndarray, label: int) -> None:
        self.seen += 1
        if self.n < self.cap:
            i = self.n
            self.n += 1
        else:
            i = int(self.rng.integers(0, self.seen))
            if i >= self.cap:
                return
        self.x[i] = f
        self.y[i] = label

    def view(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[:self.n].copy(), self.y[:self.n].copy()


class FeatureBuffer:
    def __init__(self, dim: int, n_classes: int, max_bytes: int = 2 << 20, policy: str = "class_balanced",
                 holdout_every: int = 5, seed: int = 0) -> None:
        if policy not in ("reservoir", "class_balanced"):
            raise ValueError(f"policy must be reservoir or class_balanced, got {policy!r}")
        if holdout_every < 2:
            raise ValueError("holdout_every must be >= 2")
        self.dim, self.n_classes, self.policy, self.holdout_every = dim, n_classes, policy, holdout_every
        per_sample = dim * 4 + 8
        total = max(2 * n_classes, max_bytes // per_sample)
        hold_cap = max(n_classes, total // holdout_every)
        train_cap = total - hold_cap
        rng = np.random.default_rng(seed)
        if policy == "reservoir":
            self._train = [_Reservoir(train_cap, dim, rng)]
        else:
            self._train = [_Reservoir(train_cap // n_classes, dim, rng) for _ in range(n_classes)]
        self._hold = _Reservoir(hold_cap, dim, rng)
        self._lock = threading.Lock()
        self.added = 0
        self.rejected: dict[str, int] = {}

    def _reject(self, why: str) -> str:
        self.rejected[why] = self.rejected.get(why, 0) + 1
        return why

    def add(self, features: np.ndarray, label: int) -> str | None:
        """Add one labelled sample; returns None, or the reason it was refused."""
        f = np.asarray(features, np.float32).reshape(-1)
        if f.shape[0] != self.dim:
            return self._reject(f"features have {f.shape[0]} values, expected {self.dim}")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (0 <= label < self.n_classes):
            return self._reject(f"label {label!r} outside 0..{self.n_classes - 1}")
        if not np.isfinite(f).all():
            return self._reject("features contain NaN or inf")
        with self._lock:
            self.added += 1
            if self.added % self.holdout_every == 0:
                self._hold.add(f, int(label))
            else:
                self._train[0 if self.policy == "reservoir" else int(label)].add(f, int(label))
        return None

    def train_view(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            parts = [r.view() for r in self._train]
        xs = [p[0] for p in parts if len(p[1])]
        if not xs:
            return np.zeros((0, self.dim), np.float32), np.zeros(0, np.int64)
        return np.concatenate(xs), np.concatenate([p[1] for p in parts if len(p[1])])

    def holdout_view(self) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._hold.view()

    @property
    def train_size(self) -> int:
        return sum(r.n for r in self._train)

    @property
    def holdout_size(self) -> int:
        return self._hold.n

    @property
    def nbytes(self) -> int:
        return sum(r.x.nbytes + r.y.nbytes for r in self._train) + self._hold.x.nbytes + self._hold.y.nbytes

    def stats(self) -> dict[str, Any]:
        return {"train": self.train_size, "holdout": self.holdout_size, "added": self.added,
                "bytes": self.nbytes, "policy": self.policy, "rejected": dict(self.rejected)}
