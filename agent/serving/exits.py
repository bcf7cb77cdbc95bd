"""Serving a bundle with early exits: run the backbone segment by segment, answer at the first
exit whose confidence passes its threshold, run later segments only when needed.

Why a separate runner: a bundle without exits keeps the engine's one-call fast path untouched
(the engine binds ``predict`` to this runner only when the bundle declares exits).

Faults: a segment that does not load, or a chain that does not match the manifest, refuses the
exits as a whole (the engine serves the whole backbone, the reason is logged and reported); an
exit head that does not load (or does not fit its tensor) disables that exit only — its segment
still runs, the next exit or the full model answers. Dropping an exit costs compute, never
accuracy: the full model is what the quality gate measured. A broken encoder disables the
bottleneck (offload then sends the cut tensor as plain uint8 features).

Offload from an exit: when the serving feature says an offload may follow (``stop_at_cut``), a
request that is not confident at the bottleneck's exit stops there; its ``resume`` finishes it
locally if the request is not offloaded after all (or the offload fails).
"""
from __future__ import annotations

from dataclasses import replace
import logging
import time
from typing import Any, Callable, Mapping

import numpy as np

from protocol.bundle import head_forward, load_head
from protocol.exits import split_tag
from protocol.verify import errors, io_of_runtime, verify_segments

from .runtimes import OnnxRuntime

log = logging.getLogger("edge_agent.serving")


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


class ExitRunner:
    def __init__(self, engine: Any, prediction: type, threads: int = 1, providers: list[str] | None = None) -> None:
        """``engine``: the InferenceEngine (its runtime, validation and counters); ``prediction``:
        its Prediction class (passed in: this module does not import the engine's)."""
        self._prediction = prediction
        b = engine.bundle
        m = b.manifest
        self.engine = engine
        self.specs = m.exits
        try:
            self.segments = [OnnxRuntime(b.path / s, threads, providers) for s in m.segments]
        except ValueError as exc:
            raise ValueError(f"segments: {exc}") from None
        bb_out = io_of_runtime(engine.runtime)[1]
        probs = errors(verify_segments(m, [io_of_runtime(s) for s in self.segments], bb_out))
        if probs:
            raise ValueError("segments do not chain to the backbone: " + "; ".join(map(str, probs)))
        self.heads: list[Mapping[str, np.ndarray] | None] = []
        self.disabled: dict[str, str] = {}
        for k, e in enumerate(self.specs):
            head = None
            try:
                head = load_head(b.path / e.head)
                shape = self.segments[k].output.shape
                want = int(np.prod([d for d in shape[1:] if d])) if len(shape) == 2 else \
                    int(shape[1] or 0) * e.pool * e.pool
                if head["dense0.weight"].shape[0] != want:
                    raise ValueError(f"takes {head['dense0.weight'].shape[0]} features, the exit gives {want}")
                if len(shape) == 4 and ((shape[2] or 0) % e.pool or (shape[3] or 0) % e.pool):
                    raise ValueError(f"tensor {list(shape)} is not divisible by pool {e.pool}")
            except ValueError as exc:
                self.disabled[e.tensor] = str(exc)[:300]
                log.warning("bundle %s %s: exit %d (%s) disabled, served without it: %s", m.name, m.version, k,
                            e.tensor, exc)
                head = None
            self.heads.append(head)
        # average pooling as one matmul per exit ([H·W] → [p·p]): numpy's axis means cost more
        # than this model's whole segments; same values as protocol.exits.exit_features
        self._pool: list[np.ndarray | None] = []
        for k, e in enumerate(self.specs):
            shape = self.segments[k].output.shape
            if len(shape) == 4 and shape[2] and shape[3]:
                hh, ww, p = int(shape[2]), int(shape[3]), e.pool
                rows = (np.arange(hh)[:, None] // (hh // p)) * p + (np.arange(ww)[None, :] // (ww // p))
                pm = np.zeros((hh * ww, p * p), np.float32)
                pm[np.arange(hh * ww), rows.reshape(-1)] = 1.0 / ((hh // p) * (ww // p))
                self._pool.append(pm)
            else:
                self._pool.append(None)
        self.thresholds = [e.threshold for e in self.specs]
        self.compute = [e.compute for e in self.specs]
        sha = m.files[str(m.file("backbone"))].sha256
        self.backbone_sha = sha
        self.tags = [split_tag(sha, e.tensor) for e in self.specs]
        self.bottleneck = m.bottleneck
        self.cut: int | None = None
        self.encoder: OnnxRuntime | None = None
        self.bottleneck_error: str | None = None
        if m.bottleneck is not None:
            self.cut = next(k for k, e in enumerate(self.specs) if e.tensor == m.bottleneck.at)
            try:
                self.encoder = OnnxRuntime(b.path / m.bottleneck.encoder, threads, providers)
            except ValueError as exc:
                self.bottleneck_error = str(exc)[:300]
                log.warning("bundle %s %s: bottleneck encoder refused, features go uncoded: %s", m.name,
                            m.version, exc)
        #: set by the serving feature: True when an offload may follow this request
        self.stop_at_cut: Callable[[], bool] = lambda: False
        n = len(self.specs) + 1
        self.answered = [0] * n
        self.labelled = [0] * n
        self.correct = [0] * n
        self.seg_ms = [0.0] * n
        self.seg_runs = [0] * n
        self.saved_ms = [0.0] * n
        self.stopped_at_cut = 0

    # -- running -------------------------------------------------------------------------------
    def _seg(self, k: int, h: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self.segments[k].run(h)
        self.seg_ms[k] += (time.perf_counter() - t) * 1000
        self.seg_runs[k] += 1
        return out

    def _mean_ms(self, k: int) -> float:
        return self.seg_ms[k] / self.seg_runs[k] if self.seg_runs[k] else 0.0

    def predict(self, x: Any) -> Any:
        eng = self.engine
        t0 = time.perf_counter()
        try:
            feed = eng.validate(x) if not isinstance(x, Mapping) else eng.validate_all(x)[eng.inputs[0].feed]
        except Exception:
            eng.errors += 1
            raise
        stop = self.cut if self.cut is not None and self.stop_at_cut() else None
        return self._from(0, feed, (), t0, stop)

    def _from(self, start: int, h: np.ndarray, tensors: tuple, t0: float, stop: int | None) -> Any:
        n = len(self.specs)
        for k in range(start, n):
            h = self._seg(k, h)
            tensors = tensors + (h,)
            head = self.heads[k]
            if head is None:
                continue
            pm = self._pool[k]
            f = h.reshape(1, -1) if pm is None else (h.reshape(h.shape[1], -1) @ pm).reshape(1, -1)
            probs = _softmax(head_forward(head, f)[0])
            conf = float(probs.max())
            if (conf >= self.thresholds[k] and self.thresholds[k] < 1.0) or k == stop:
                resume = None
                if not (conf >= self.thresholds[k] and self.thresholds[k] < 1.0):
                    self.stopped_at_cut += 1
                    resume = (lambda h=h, t=tensors, k=k: self._from(k + 1, h, t, time.perf_counter(), None))
                pred = self._exit_prediction(probs, h, t0, k, tensors, resume)
                return pred
        out = self._seg(n, h)
        pred = self.engine._classified(out, t0)
        self.answered[n] += 1
        return replace(pred, exit=n, tensors=tensors)

    def _exit_prediction(self, probs: np.ndarray, h: np.ndarray, t0: float, k: int, tensors: tuple,
                         resume: Callable[[], Any] | None) -> Any:
        eng = self.engine
        label = int(probs.argmax())
        conf = float(probs[label])
        ent = float(-np.dot(probs, np.log(np.maximum(probs, 1e-30))))
        ms = (time.perf_counter() - t0) * 1000.0
        if resume is None:   # a stop for a possible offload is not an answer (resume() counts it)
            eng.hist.record(ms)
            eng.count += 1
            eng._conf_sum += conf
            eng._ent_sum += ent
            self.answered[k] += 1
            self.saved_ms[k] += sum(self._mean_ms(j) for j in range(k + 1, len(self.specs) + 1))
        name = eng.labels[label] if label < len(eng.labels) else None
        return self._prediction(label, name, conf, probs, ent, h, ms, exit=k, tensors=tensors, resume=resume)

    # -- offload -------------------------------------------------------------------------------
    def offload_tensor(self, pred: Any) -> tuple[np.ndarray, dict[str, Any], bool]:
        """What an offloaded request carries for this prediction: the bottleneck code at the cut
        (running the segments up to it if the answer came earlier), else the tensor of the exit
        that answered as uint8 with a scale. Returns (tensor, body fields, compress)."""
        k = len(self.specs) if pred.exit is None else pred.exit
        tensors = pred.tensors
        if self.cut is not None and self.encoder is not None:
            c = self.cut
            if len(tensors) <= c:
                h = tensors[-1]
                for j in range(len(tensors), c + 1):
                    h = self._seg(j, h)
                    tensors = tensors + (h,)
            code = self.encoder.run(np.asarray(tensors[c], np.float32))
            bn = self.bottleneck
            assert bn is not None
            # no "exit": the split names the cut (every byte counts in a 320-value request)
            return code, {"split": self.tags[c], "codec": bn.codec, "bottleneck": bn.id}, True
        f = np.asarray(pred.features, np.float32)
        top = float(f.max()) if f.size else 0.0
        scale = top / 255.0 if top > 0 else 1.0
        q = np.clip(np.round(f / scale), 0, 255).astype(np.uint8)
        if k >= len(self.specs):
            return q.reshape(-1), {"scale": scale}, False
        return q, {"split": self.tags[k], "exit": k, "scale": scale}, False

    def routing_split(self, pred: Any) -> str:
        """What ``offload_tensor`` will send, as workers advertise it (``accepts.splits``)."""
        if self.cut is not None and self.encoder is not None and self.bottleneck is not None:
            return f"{self.tags[self.cut]}+{self.bottleneck.id}"
        k = len(self.specs) if pred.exit is None else pred.exit
        return self.tags[k] if k < len(self.specs) else self.backbone_sha

    # -- telemetry -----------------------------------------------------------------------------
    def observe(self, pred: Any, label: Any) -> None:
        """A labelled request (``label`` in the request, or a labelled source sample)."""
        if pred.exit is None or label is None or pred.resume is not None:
            return
        try:
            y = int(label)
        except (TypeError, ValueError):
            return
        self.labelled[pred.exit] += 1
        self.correct[pred.exit] += int(pred.label == y)

    def metrics(self) -> dict[str, Any]:
        n = len(self.specs)
        total = sum(self.answered) or 1
        rows = []
        for k in range(n + 1):
            e = self.specs[k] if k < n else None
            rows.append({"tensor": e.tensor if e else "final", "threshold": e.threshold if e else None,
                         "answered": self.answered[k], "rate": round(self.answered[k] / total, 4),
                         "accuracy": round(self.correct[k] / self.labelled[k], 4) if self.labelled[k] else None,
                         "labelled": self.labelled[k], "segment_ms_mean": round(self._mean_ms(k), 4),
                         "time_saved_ms": round(self.saved_ms[k], 3)})
        # backbone MACs up to the exit + every enabled exit head evaluated on the way
        heads = np.cumsum([(e.head_compute or 0.0) if h is not None else 0.0 for e, h in zip(self.specs, self.heads)])
        bb = [c if c is not None else 1.0 for c in self.compute] + [1.0]
        frac = [f + float(heads[min(k, len(heads) - 1)]) for k, f in enumerate(bb)]
        spent = sum(a * f for a, f in zip(self.answered, frac))
        bb_spent = sum(a * f for a, f in zip(self.answered, bb))
        out: dict[str, Any] = {"exits": rows, "disabled": dict(self.disabled),
                               "compute_saved": round(1.0 - spent / total, 4) if sum(self.answered) else None,
                               "backbone_saved": round(1.0 - bb_spent / total, 4) if sum(self.answered) else None,
                               "time_saved_ms": round(sum(self.saved_ms), 3),
                               "stopped_for_offload": self.stopped_at_cut}
        if self.bottleneck is not None:
            out["bottleneck"] = {"id": self.bottleneck.id, "at": self.bottleneck.at,
                                 "ok": self.encoder is not None, "error": self.bottleneck_error}
        return out

