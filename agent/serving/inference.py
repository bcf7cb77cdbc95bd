"""The inference engine: validated input → backbone (ONNX Runtime / LiteRT) → head → answer.

Kept lean on the hot path: one runtime call, a few numpy operations, counters. The
head can be swapped atomically by the learner (a single reference assignment), so
inference always uses the last good head and never waits for training.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
import threading
import time
from typing import Any, Mapping

import numpy as np

from protocol.bundle import Bundle, check_head, head_forward

from .histogram import LatencyHistogram
from .runtimes import Runtime, make_runtime


class InputError(ValueError):
    """A request input we refuse (shape, dtype, NaN/inf, out of range); the message says which."""


@dataclass(frozen=True, slots=True)
class Prediction:
    label: int
    label_name: str | None
    confidence: float
    probabilities: np.ndarray
    entropy: float
    features: np.ndarray
    latency_ms: float


def _softmax1(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    e /= e.sum()
    return e


class InferenceEngine:
    def __init__(self, bundle: Bundle, threads: int = 1, providers: list[str] | None = None,
                 runtime: Runtime | None = None) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.runtime = runtime or make_runtime(bundle.backbone_path, threads, providers)
        self.spec = m.input
        sample = tuple(d for d in self.spec.shape[1:])
        if any(d is None for d in sample):
            raise ValueError(f"input spec {list(self.spec.shape)}: only the batch dimension may be dynamic")
        self._sample_shape: tuple[int, ...] = tuple(int(d) for d in sample)  # type: ignore[arg-type]
        self._sample_size = int(np.prod(self._sample_shape))
        self._batch_shape = (1,) + self._sample_shape
        self._lo = -np.inf if self.spec.min is None else float(self.spec.min)
        self._hi = np.inf if self.spec.max is None else float(self.spec.max)
        self._tol = 1e-6 * max(1.0, abs(self._lo) if np.isfinite(self._lo) else 1.0,
                               abs(self._hi) if np.isfinite(self._hi) else 1.0)
        self.labels = m.labels
        self._head: Mapping[str, np.ndarray] | None = bundle.head
        self.head_version = 0
        self._lock = threading.Lock()
        self.hist = LatencyHistogram()
        self.count = 0
        self.errors = 0
        self._conf_sum = 0.0
        self._ent_sum = 0.0
        self._t0 = time.monotonic()

    # -- head ----------------------------------------------------------------
    @property
    def head(self) -> Mapping[str, np.ndarray] | None:
        return self._head

    def swap_head(self, head: Mapping[str, np.ndarray]) -> None:
        """Atomically replace the head (validated first; shapes must match the current one)."""
        new = check_head(head)
        cur = self._head
        if cur is not None and {k: v.shape for k, v in cur.items()} != {k: v.shape for k, v in new.items()}:
            raise ValueError("new head's tensor shapes differ from the serving head")
        self._head = new
        self.head_version += 1

    # -- requests ------------------------------------------------------------
    def validate(self, x: Any) -> np.ndarray:
        try:
            a = np.asarray(x, dtype=np.float32)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input is not numeric: {exc}") from None
        if a.size != self._sample_size or a.ndim > len(self._batch_shape):
            raise InputError(f"input has shape {list(a.shape)}; expected {list(self._sample_shape)} "
                             f"(or {list(self._batch_shape)})")
        a = a.reshape(self._batch_shape)
        lo, hi = float(a.min()), float(a.max())  # NaN propagates through min/max: one pass checks both
        if not (lo >= self._lo - self._tol and hi <= self._hi + self._tol):
            if lo != lo or hi != hi or np.isinf(lo) or np.isinf(hi):
                raise InputError("input contains NaN or inf")
            raise InputError(f"input values span [{lo:g}, {hi:g}], outside the model's range "
                             f"[{self._lo:g}, {self._hi:g}]")
        if np.isinf(self._lo) or np.isinf(self._hi):
            if not np.isfinite(a).all():
                raise InputError("input contains NaN or inf")
        return a

    def features(self, x: Any) -> np.ndarray:
        """Backbone output for one validated input (split computing sends this)."""
        return self.runtime.run(self.validate(x))

    def predict(self, x: Any) -> Prediction:
        t0 = time.perf_counter()
        try:
            a = self.validate(x)
        except InputError:
            self.errors += 1
            raise
        out = self.runtime.run(a)
        head = self._head
        if head is not None:
            probs = _softmax1(head_forward(head, out.reshape(1, -1))[0])
        else:
            flat = out.reshape(-1).astype(np.float32, copy=False)
            s = float(flat.sum())
            probs = flat if (flat.min() >= 0 and abs(s - 1.0) < 1e-3) else _softmax1(flat)
        label = int(probs.argmax())
        conf = float(probs[label])
        ent = float(-np.dot(probs, np.log(np.maximum(probs, 1e-30))))
        ms = (time.perf_counter() - t0) * 1000.0
        self.hist.record(ms)
        self.count += 1
        self._conf_sum += conf
        self._ent_sum += ent
        name = self.labels[label] if label < len(self.labels) else None
        return Prediction(label, name, conf, probs, ent, out, ms)

    def metrics(self) -> dict[str, Any]:
        m = self.bundle.manifest
        elapsed = max(1e-9, time.monotonic() - self._t0)
        h = self.hist.summary()
        return {"name": m.name, "version": m.version, "runtime": self.runtime.name,
                "head_version": self.head_version, "inferences": self.count, "input_errors": self.errors,
                "latency_ms": {k: h[k] for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")},
                "throughput_per_s": round(self.count / elapsed, 3),
                "mean_confidence": round(self._conf_sum / self.count, 5) if self.count else None,
                "mean_entropy": round(self._ent_sum / self.count, 5) if self.count else None}


def entropy_of(probs: np.ndarray) -> float:
    nz = probs[probs > 0]
    return float(-(nz * np.log(nz)).sum()) if nz.size else 0.0


def max_entropy(n_classes: int) -> float:
    return math.log(n_classes) if n_classes > 1 else 0.0
