"""A bounded replay buffer of backbone *features* (never raw inputs), capped in bytes.

A deterministic share of the labelled samples — every ``holdout_every``-th one
(``split="every_k"``), or those whose sample id hashes to 0 mod ``holdout_every``
(``split="hash"``: the same sample always lands on the same side, across restarts and
re-sends) — goes to a held-out slice that training never sees; candidate heads are judged
on it. Policies: ``reservoir`` (uniform over everything
seen) or ``class_balanced`` (a reservoir per class, so a rare class is not crowded out).
Thread-safe: the loop thread adds, the training thread snapshots.
"""
from __future__ import annotations

import threading
import zlib
from typing import Any, Mapping

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

    def restore(self, x: np.ndarray, y: np.ndarray, seen: int) -> None:
        k = min(len(y), self.cap)
        self.x[:k], self.y[:k] = x[:k], y[:k]
        self.n, self.seen = k, max(int(seen), k)


class FeatureBuffer:
    def __init__(self, dim: int, n_classes: int, max_bytes: int = 2 << 20, policy: str = "class_balanced",
                 holdout_every: int = 5, seed: int = 0, split: str = "every_k") -> None:
        if policy not in ("reservoir", "class_balanced"):
            raise ValueError(f"policy must be reservoir or class_balanced, got {policy!r}")
        if split not in ("every_k", "hash"):
            raise ValueError(f"split must be every_k or hash, got {split!r}")
        if holdout_every < 2:
            raise ValueError("holdout_every must be >= 2")
        self.dim, self.n_classes, self.policy, self.holdout_every = dim, n_classes, policy, holdout_every
        self.split = split
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

    def is_holdout(self, sample_id: str | None, ordinal: int) -> bool:
        """Whether the ``ordinal``-th accepted sample (1-based) with this id is held out."""
        if self.split == "hash":
            if sample_id is None:
                raise ValueError("split='hash' needs a sample id")
            return zlib.crc32(str(sample_id).encode()) % self.holdout_every == 0
        return ordinal % self.holdout_every == 0

    def add(self, features: np.ndarray, label: int, sample_id: str | None = None) -> str | None:
        """Add one labelled sample; returns None, or the reason it was refused."""
        f = np.asarray(features, np.float32).reshape(-1)
        if f.shape[0] != self.dim:
            return self._reject(f"features have {f.shape[0]} values, expected {self.dim}")
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not (0 <= label < self.n_classes):
            return self._reject(f"label {label!r} outside 0..{self.n_classes - 1}")
        if not np.isfinite(f).all():
            return self._reject("features contain NaN or inf")
        if self.split == "hash" and sample_id is None:
            return self._reject("no sample id (the hash split needs one)")
        with self._lock:
            self.added += 1
            if self.is_holdout(sample_id, self.added):
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

    def state(self) -> dict[str, np.ndarray]:
        """Contents as plain arrays (for a checkpoint ``.npz``)."""
        with self._lock:
            out = {"meta": np.array([self.dim, self.n_classes, self.added], np.int64)}
            for name, r in [(f"train{i}", r) for i, r in enumerate(self._train)] + [("hold", self._hold)]:
                x, y = r.view()
                out[f"{name}.x"], out[f"{name}.y"], out[f"{name}.seen"] = x, y, np.array([r.seen], np.int64)
            return out

    def load_state(self, st: Mapping[str, np.ndarray]) -> None:
        """Restore ``state()`` output; what no longer fits the (maybe smaller) capacity is dropped."""
        meta = np.asarray(st["meta"]).reshape(-1)
        if int(meta[0]) != self.dim or int(meta[1]) != self.n_classes:
            raise ValueError(f"saved buffer is for {int(meta[0])} features / {int(meta[1])} classes, "
                             f"this one for {self.dim} / {self.n_classes}")
        names = [f"train{i}" for i in range(len(self._train))]
        if f"train{len(self._train)}.x" in st or any(f"{n}.x" not in st for n in names):
            raise ValueError("saved buffer was written with another replay policy")
        with self._lock:
            for name, r in [(n, r) for n, r in zip(names, self._train)] + [("hold", self._hold)]:
                x = np.asarray(st[f"{name}.x"], np.float32).reshape(-1, self.dim)
                y = np.asarray(st[f"{name}.y"], np.int64).reshape(-1)
                if len(x) != len(y) or (len(y) and (y.min() < 0 or y.max() >= self.n_classes)):
                    raise ValueError(f"saved buffer {name} is inconsistent")
                r.restore(x, y, int(np.asarray(st[f"{name}.seen"]).reshape(-1)[0]))
            self.added = int(meta[2])

    def stats(self) -> dict[str, Any]:
        return {"train": self.train_size, "holdout": self.holdout_size, "added": self.added,
                "bytes": self.nbytes, "policy": self.policy, "split": self.split, "rejected": dict(self.rejected)}
