"""The inference engine: validated input → backbone (ONNX Runtime / LiteRT) → head → answer.

Kept lean on the hot path: one runtime call, a few numpy operations, counters. The
head can be swapped atomically by the learner (a single reference assignment), so
inference always uses the last good head and never waits for training.
"""
from __future__ import annotations

from dataclasses import dataclass
import logging
import math
import threading
import time
from typing import Any, Callable, Mapping

import numpy as np

from protocol.bundle import Bundle, check_head, head_forward

from .histogram import LatencyHistogram
from .runtimes import Runtime, make_runtime
from .tasks import DEFAULT_TOP_K, shape_answer, top_k

log = logging.getLogger("edge_agent.serving")


class InputError(ValueError):
    """A request input we refuse; the message says which input and why, ``reason`` is the code
    the error reply carries (``bad_shape``, ``bad_dtype``, ``out_of_range``, ``bad_value``,
    ``missing_input``)."""

    def __init__(self, message: str, reason: str = "bad_value") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Prediction:
    label: int
    label_name: str | None
    confidence: float
    probabilities: np.ndarray
    entropy: float
    features: np.ndarray
    latency_ms: float
    # early exits (agent/serving/exits.py): the exit that answered (len(exits) = the full model),
    # the exit tensors computed so far, and, when the request stopped at the bottleneck's exit for
    # a possible offload, what finishes it locally
    exit: int | None = None
    tensors: tuple = ()
    resume: "Callable[[], Prediction] | None" = None


@dataclass(frozen=True, slots=True)
class Answer:
    """One served request: the task's JSON-ready result and, for classify, the Prediction the
    offload policy, learning and the taps use."""

    result: dict[str, Any]
    prediction: Prediction | None
    latency_ms: float


@dataclass(frozen=True, slots=True)
class InputCheck:
    """One declared model input: what a request must send for it, and the runtime name it feeds."""

    name: str
    feed: str
    sample: tuple[int, ...]
    batch: tuple[int, ...]
    size: int
    dtype: np.dtype
    lo: float
    hi: float
    tol: float


def _softmax1(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max())
    e /= e.sum()
    return e


def _input_check(spec: Any, feed: str) -> InputCheck:
    sample = tuple(spec.shape[1:])
    if any(d is None for d in sample):
        raise ValueError(f"input {spec.name!r} spec {list(spec.shape)}: only the batch dimension may be dynamic")
    sample_i = tuple(int(d) for d in sample)  # type: ignore[arg-type]
    lo = -np.inf if spec.min is None else float(spec.min)
    hi = np.inf if spec.max is None else float(spec.max)
    tol = 1e-6 * max(1.0, abs(lo) if np.isfinite(lo) else 1.0, abs(hi) if np.isfinite(hi) else 1.0)
    return InputCheck(spec.name, feed, sample_i, (1,) + sample_i, int(np.prod(sample_i)), np.dtype(spec.dtype),
                      lo, hi, tol)


def _match(declared: list[str], actual: list[str], what: str) -> list[str]:
    """Runtime names for the declared ones: by name when they all exist; inputs else by position."""
    if all(n in actual for n in declared):
        return list(declared)
    if what == "output":
        raise ValueError(f"manifest outputs {declared} are not all among the model's outputs {actual}")
    if len(declared) == len(actual):      # old manifests name the input freely ("x", "input")
        return list(actual)
    raise ValueError(f"manifest declares {len(declared)} {what}(s) {declared}; the model has {actual}")


def check_input(c: InputCheck, x: Any) -> np.ndarray:
    """One input, validated and in the model's dtype and batch shape, or InputError.

    JSON lists are converted to the declared dtype (integers must be whole and in range); a binary
    tensor must already be the declared dtype or safely widen to it (uint8 image → float32
    model), never float → integer. A flat vector input takes any shape of the right size; a
    multi-dimensional one takes exactly its sample shape or the batch-of-1 shape (a 224×224×3
    image is not silently reshaped into 3×224×224)."""
    want = c.dtype
    if isinstance(x, np.ndarray):
        a = x
        if a.dtype != want:
            k = a.dtype.kind
            if k not in "biuf" or (k == "f" and want.kind in "iub"):
                raise InputError(f"input {c.name!r} is {a.dtype.name}; the model takes {want.name}", "bad_dtype")
            a = _cast(c, a)
    else:
        try:
            a = np.asarray(x, dtype=want) if want.kind == "f" else np.asarray(x)
        except (ValueError, TypeError) as exc:
            raise InputError(f"input {c.name!r} is not numeric: {exc}", "bad_value") from None
        if a.dtype != want:
            if a.dtype.kind not in "biuf":
                raise InputError(f"input {c.name!r} is not numeric", "bad_value")
            if a.dtype.kind == "f" and a.size and not np.array_equal(a, np.round(a)):
                raise InputError(f"input {c.name!r} has fractional values; the model takes {want.name}", "bad_dtype")
            a = _cast(c, a)
    if a.size != c.size or a.ndim > len(c.batch) or (
            len(c.sample) > 1 and a.shape != c.sample and a.shape != c.batch):
        raise InputError(f"input {c.name!r} has shape {list(a.shape)}; expected {list(c.sample)} "
                         f"(or {list(c.batch)})", "bad_shape")
    if a.shape != c.batch:
        a = a.reshape(c.batch)
    if a.dtype.kind == "f" or np.isfinite(c.lo) or np.isfinite(c.hi):
        lo, hi = float(a.min()), float(a.max())  # NaN propagates through min/max: one pass checks both
        if not (lo >= c.lo - c.tol and hi <= c.hi + c.tol):
            if lo != lo or hi != hi or np.isinf(lo) or np.isinf(hi):
                raise InputError(f"input {c.name!r} contains NaN or inf", "bad_value")
            raise InputError(f"input values span [{lo:g}, {hi:g}], outside the model's range "
                             f"[{c.lo:g}, {c.hi:g}]", "out_of_range")
        if a.dtype.kind == "f" and (np.isinf(c.lo) or np.isinf(c.hi)) and not np.isfinite(a).all():
            raise InputError(f"input {c.name!r} contains NaN or inf", "bad_value")
    return a


def _cast(c: InputCheck, a: np.ndarray) -> np.ndarray:
    if c.dtype.kind in "iu" and a.size:
        info = np.iinfo(c.dtype)
        lo, hi = a.min(), a.max()
        if lo < info.min or hi > info.max:
            raise InputError(f"input {c.name!r} values span [{lo}, {hi}], outside {c.dtype.name}", "bad_dtype")
    return a.astype(c.dtype)


class InferenceEngine:
    def __init__(self, bundle: Bundle, threads: int = 1, providers: list[str] | None = None,
                 runtime: Runtime | None = None) -> None:
        self.bundle = bundle
        m = bundle.manifest
        self.runtime = runtime or make_runtime(bundle.backbone_path, threads, providers)
        rt_inputs = [i.name for i in getattr(self.runtime, "inputs", (self.runtime.input,))]
        rt_outputs = [o.name for o in getattr(self.runtime, "outputs", (self.runtime.output,))]
        specs = list(m.inputs or (m.input,))
        feeds = _match([s.name for s in specs], rt_inputs, "input")
        self.inputs: tuple[InputCheck, ...] = tuple(_input_check(s, f) for s, f in zip(specs, feeds))
        self.spec = m.input
        first = self.inputs[0]
        self._sample_shape, self._sample_size, self._batch_shape = first.sample, first.size, first.batch
        #: served outputs: (name in the answer, runtime output name)
        declared = [o.name for o in m.outputs]
        served = _match(declared, rt_outputs, "output") if declared else [rt_outputs[0]]
        self.outputs: tuple[tuple[str, str], ...] = tuple(zip(declared or served, served))
        self._out_names = [rt for _, rt in self.outputs]
        self.task = m.task
        self.task_params = dict(m.task_params or {})
        #: one input, the model's first output: ``runtime.run`` (the digits MLP's path)
        self._fast = (len(self.inputs) == 1 and first.feed == rt_inputs[0] and self._out_names == [rt_outputs[0]])
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
        #: early exits, when the bundle declares them: ``predict`` then runs segment by segment
        self.exits = None
        self.exits_error: str | None = None
        if m.exits:
            from .exits import ExitRunner

            try:
                self.exits = ExitRunner(self, Prediction, threads, providers)
                self.predict = self.exits.predict  # type: ignore[method-assign]
            except ValueError as exc:
                self.exits_error = str(exc)[:500]
                log.warning("bundle %s %s: early exits refused, serving the whole backbone: %s", m.name,
                            m.version, exc)

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
        """The first (usually only) input, validated (see ``check_input``)."""
        return check_input(self.inputs[0], x)

    def validate_all(self, inputs: Mapping[str, Any] | Any) -> dict[str, np.ndarray]:
        """Every declared input by name (runtime feed names as keys). A single-input model also
        takes its input bare, or under any one name."""
        if not isinstance(inputs, Mapping):
            if len(self.inputs) != 1:
                raise InputError(f"the model takes {len(self.inputs)} inputs "
                                 f"{[c.name for c in self.inputs]}: send them by name", "missing_input")
            return {self.inputs[0].feed: check_input(self.inputs[0], inputs)}
        if len(self.inputs) == 1 and len(inputs) == 1:
            return {self.inputs[0].feed: check_input(self.inputs[0], next(iter(inputs.values())))}
        missing = [c.name for c in self.inputs if c.name not in inputs]
        if missing:
            raise InputError(f"missing input(s) {missing}; the model takes {[c.name for c in self.inputs]}",
                             "missing_input")
        extra = sorted(set(inputs) - {c.name for c in self.inputs})
        if extra:
            raise InputError(f"unknown input(s) {extra}; the model takes {[c.name for c in self.inputs]}",
                             "missing_input")
        return {c.feed: check_input(c, inputs[c.name]) for c in self.inputs}

    def features(self, x: Any) -> np.ndarray:
        """Backbone output for one validated input (split computing sends this)."""
        if self._fast and not isinstance(x, Mapping):
            return self.runtime.run(self.validate(x))
        return self.runtime.run_named(self.validate_all(x), self._out_names[:1])[self._out_names[0]]

    def predict(self, x: Any) -> Prediction:
        """Classify one input: the fast path for single-input models; any bundle whose task is
        classify (multi-input too, given a mapping of inputs)."""
        t0 = time.perf_counter()
        try:
            if self._fast:
                out = self.runtime.run(self.validate(x) if not isinstance(x, Mapping)
                                       else self.validate_all(x)[self.inputs[0].feed])
            else:
                feeds = self.validate_all(x)
                out = self.runtime.run_named(feeds, self._out_names[:1])[self._out_names[0]]
        except InputError:
            self.errors += 1
            raise
        return self._classified(out, t0)

    def _classified(self, out: np.ndarray, t0: float) -> Prediction:
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

    def answer(self, inputs: Mapping[str, Any] | Any) -> Answer:
        """Serve one request for the bundle's task. InputError for a bad input; anything else the
        runtime or the outputs raise is the caller's ``internal`` error."""
        if self.task == "classify":
            pred = self.predict(inputs)
            k = int(self.task_params.get("top_k", DEFAULT_TOP_K))
            result = {"task": "classify", "label": pred.label, "label_name": pred.label_name,
                      "confidence": round(pred.confidence, 5), "entropy": round(pred.entropy, 5),
                      "top_k": top_k(pred.probabilities, self.labels, k)}
            return Answer(result, pred, pred.latency_ms)
        t0 = time.perf_counter()
        try:
            feeds = self.validate_all(inputs)
        except InputError:
            self.errors += 1
            raise
        got = self.runtime.run_named(feeds, self._out_names)
        outs = {name: got[rt] for name, rt in self.outputs}
        head = self._head
        if head is not None and self.task in ("regress", "embed"):
            name = self.outputs[0][0]
            outs[name] = head_forward(head, np.asarray(outs[name], dtype=np.float32).reshape(1, -1))[0]
        result = {"task": self.task, **shape_answer(self.task, outs, self.task_params, self.labels)}
        ms = (time.perf_counter() - t0) * 1000.0
        self.hist.record(ms)
        self.count += 1
        return Answer(result, None, ms)

    def metrics(self) -> dict[str, Any]:
        m = self.bundle.manifest
        elapsed = max(1e-9, time.monotonic() - self._t0)
        h = self.hist.summary()
        return {"name": m.name, "version": m.version, "runtime": self.runtime.name, "task": self.task,
                "head_version": self.head_version, "inferences": self.count, "input_errors": self.errors,
                "latency_ms": {k: h[k] for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")},
                "throughput_per_s": round(self.count / elapsed, 3),
                "mean_confidence": round(self._conf_sum / self.count, 5) if self.count else None,
                "mean_entropy": round(self._ent_sum / self.count, 5) if self.count else None,
                **({"early_exits": self.exits.metrics()} if self.exits is not None else {}),
                **({"early_exits_error": self.exits_error} if self.exits_error else {})}


def entropy_of(probs: np.ndarray) -> float:
    nz = probs[probs > 0]
    return float(-(nz * np.log(nz)).sum()) if nz.size else 0.0


def max_entropy(n_classes: int) -> float:
    return math.log(n_classes) if n_classes > 1 else 0.0
