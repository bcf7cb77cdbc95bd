"""Static int8 quantization with ONNX Runtime, and an honest fp32 vs int8 comparison.

``quantize_model`` refuses with a reason (``QuantizeError``) instead of a traceback: a graph with
no op ONNX Runtime quantizes (e.g. only ``ai.onnx.ml`` ops) stays float. Ops it cannot quantize
are left in float by ONNX Runtime itself; ``float_ops`` says which. ONNX Runtime's own warnings
are silenced while it works (its logger severity and Python's ``root`` logger it writes to), so the
CLI prints only what we say. ``compare`` measures both models on the same data: size, accuracy
(with labels), agreement, p50 latency; ``decide`` never calls a bigger model smaller.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
import logging
from pathlib import Path
import time
from typing import Any, Iterator, Mapping

import numpy as np

#: ops ONNX Runtime's static quantizer turns into int8 (the weight-carrying ones that matter for size)
QUANTIZABLE = {"Conv", "ConvTranspose", "MatMul", "Gemm", "Gather", "Attention", "LSTM", "EmbedLayerNormalization"}


class QuantizeError(ValueError):
    """Quantization refused or failed; the message says why (never a traceback)."""


@contextmanager
def quiet_ort() -> Iterator[None]:
    """ONNX Runtime logs through its C++ logger and Python's root logger: keep both at ERROR."""
    import onnxruntime as ort

    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        root.setLevel(old)


def session(path: str | Path, threads: int = 1) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def float_ops(model: Any) -> dict[str, int]:
    """Ops that stay float after quantization (other domains and standard ops with no int8 kernel)."""
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            k = f"{n.domain}.{n.op_type}"
            out[k] = out.get(k, 0) + 1
    return out


def quantizable(model: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        if n.domain in ("", "ai.onnx") and n.op_type in QUANTIZABLE:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return out


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader protocol over one feed dict per sample."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self.feeds = feeds
        self._it = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.feeds)


def quantize_model(src: str | Path, dst: str | Path, feeds: list[dict[str, np.ndarray]],
                   per_channel: bool = True) -> str:
    """Quantize ``src`` to ``dst`` on calibration ``feeds``; returns the format used (QOperator or QDQ)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src), load_external_data=False)
    q = quantizable(model)
    if not q:
        ops = sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node})
        raise QuantizeError(f"nothing to quantize: {Path(src).name} has no op ONNX Runtime quantizes "
                            f"({', '.join(sorted(QUANTIZABLE))}); its ops {ops} stay float — keep the fp32 model")
    if len(feeds) < 1:
        raise QuantizeError("no calibration samples")
    errors = []
    for fmt in (QuantFormat.QOperator, QuantFormat.QDQ):
        try:
            with quiet_ort():
                quantize_static(str(src), str(dst), _Reader(feeds), quant_format=fmt,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                per_channel=per_channel, calibrate_method=CalibrationMethod.MinMax)
                session(dst)  # it must load
            return "QOperator" if fmt == QuantFormat.QOperator else "QDQ"
        except Exception as exc:  # noqa: BLE001 - the quantizer raises whatever its passes raise
            errors.append(f"{fmt.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}")
    raise QuantizeError("ONNX Runtime could not quantize this model: " + "; ".join(errors))


@dataclass(frozen=True)
class Comparison:
    fp32_bytes: int
    int8_bytes: int
    samples: int
    agreement: float | None          # argmax agreement (classify) on the comparison data
    max_abs_diff: float
    fp32_accuracy: float | None
    int8_accuracy: float | None
    fp32_p50_ms: float
    int8_p50_ms: float

    @property
    def size_ratio(self) -> float:
        """fp32 / int8: > 1 means int8 is smaller."""
        return self.fp32_bytes / max(1, self.int8_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "size_ratio": round(self.size_ratio, 4)}


def run_rows(sess: Any, feeds: list[dict[str, np.ndarray]], output: str | None = None) -> tuple[np.ndarray, float]:
    """One output for every feed (stacked), and the p50 latency in ms."""
    name = output or sess.get_outputs()[0].name
    outs, lat = [], []
    for f in feeds:
        t0 = time.perf_counter()
        y = sess.run([name], f)[0]
        lat.append((time.perf_counter() - t0) * 1000)
        outs.append(np.asarray(y, np.float32).reshape(-1))
    return np.stack(outs), float(np.median(lat))


def compare(fp32: str | Path, int8: str | Path, feeds: list[dict[str, np.ndarray]], labels: np.ndarray | None,
            output: str | None = None, head: Mapping[str, np.ndarray] | None = None) -> Comparison:
    """Both models on the same samples (with the head on top when there is one)."""
    from protocol.bundle import head_forward

    a, la = run_rows(session(fp32), feeds, output)
    b, lb = run_rows(session(int8), feeds, output)
    if head is not None:
        a, b = head_forward(head, a), head_forward(head, b)
    agree = float((a.argmax(1) == b.argmax(1)).mean()) if a.shape[1] > 1 else None
    acc = lambda s: float((s.argmax(1) == labels).mean()) if labels is not None and s.shape[1] > 1 else None  # noqa
    return Comparison(Path(fp32).stat().st_size, Path(int8).stat().st_size, len(feeds), agree,
                      float(np.abs(a - b).max()), acc(a), acc(b), round(la, 4), round(lb, 4))


def decide(c: Comparison, max_drop: float = 0.02) -> tuple[bool, list[str]]:
    """Keep int8? Never when it is not smaller; a drop past ``max_drop`` keeps int8 with a warning."""
    notes = []
    if c.int8_bytes >= c.fp32_bytes:
        notes.append(f"int8 is not smaller ({c.int8_bytes / 1024:.0f} KB vs fp32 {c.fp32_bytes / 1024:.0f} KB: "
                     "quantization parameters outweigh the saved weights): keeping fp32")
        return False, notes
    if c.fp32_accuracy is not None and c.int8_accuracy is not None and c.fp32_accuracy - c.int8_accuracy > max_drop:
        notes.append(f"WARNING: int8 accuracy {c.int8_accuracy:.2%} is {100 * (c.fp32_accuracy - c.int8_accuracy):.1f} "
                     f"pts below fp32 {c.fp32_accuracy:.2%} (bound {100 * max_drop:.1f} pts)")
    return True, notes


def size_line(a: int, b: int) -> str:
    """``572 KB → 287 KB (1.99x smaller)``, or ``… (1.18x bigger)``: never a bigger model called smaller."""
    if b < a:
        return f"{a / 1024:.0f} KB → {b / 1024:.0f} KB ({a / max(1, b):.2f}x smaller)"
    if b == a:
        return f"{a / 1024:.0f} KB → {b / 1024:.0f} KB (the same size)"
    return f"{a / 1024:.0f} KB → {b / 1024:.0f} KB ({b / max(1, a):.2f}x bigger)"
