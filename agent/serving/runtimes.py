"""Inference runtimes behind one small interface, chosen by file type and imported lazily.

A board installs only what it uses: ``edgefleet[onnx]`` (ONNX Runtime) or
``edgefleet[litert]`` (``ai-edge-litert``; ``tflite-runtime`` is accepted as a fallback).
tflite-runtime 2.14 wheels were built against numpy 1 and fail at run time under numpy 2;
that combination is detected and refused with a clear message instead of crashing.
"""
from __future__ import annotations

from dataclasses import dataclass
import importlib.util
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np


class RuntimeUnavailable(RuntimeError):
    """The runtime a model needs is not installed (or cannot work here)."""


@dataclass(frozen=True)
class IOInfo:
    name: str
    shape: tuple[int | None, ...]
    dtype: str


class Runtime(Protocol):
    """``run`` is the single-input, first-output fast path (the digits MLP: one dict, one list);
    ``run_named`` feeds every input by name and returns the named outputs (multi-IO models)."""

    name: str
    input: IOInfo
    output: IOInfo
    inputs: tuple[IOInfo, ...]
    outputs: tuple[IOInfo, ...]

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def run_named(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]: ...


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 1, providers: list[str] | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeUnavailable("ONNX Runtime is not installed: pip install 'edgefleet[onnx]'") from None
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        avail = ort.get_available_providers()
        wanted = [p for p in (providers or ["CPUExecutionProvider"]) if p in avail] or ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(path), so, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise ValueError(f"ONNX Runtime cannot load {path.name}: {exc}") from None
        info = lambda t: IOInfo(t.name, tuple(d if isinstance(d, int) else None for d in t.shape), _ort_dtype(t.type))
        self.inputs = tuple(info(t) for t in self.session.get_inputs())
        self.outputs = tuple(info(t) for t in self.session.get_outputs())
        self.input, self.output = self.inputs[0], self.outputs[0]
        self._run = self.session.run
        self._out = [self.output.name]
        self.providers = wanted

    def run(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._out, {self.input.name: x})[0]

    def run_named(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        return dict(zip(outputs, self._run(outputs, feeds)))


def _ort_dtype(t: str) -> str:
    return {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
            "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32"}.get(t, t)


def _litert_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter

        return Interpreter
    except ImportError:
        pass
    try:
        import tflite_runtime  # type: ignore[import-not-found]
        from tflite_runtime.interpreter import Interpreter  # type: ignore[import-not-found]
    except ImportError:
        raise RuntimeUnavailable("LiteRT is not installed: pip install 'edgefleet[litert]' "
                                 "(ai-edge-litert; tflite-runtime also works with numpy < 2)") from None
    ver = getattr(tflite_runtime, "__version__", "0")
    if int(np.__version__.split(".")[0]) >= 2 and ver.startswith(("2.1", "2.0")):
        raise RuntimeUnavailable(f"tflite-runtime {ver} was built for numpy 1 and fails under numpy {np.__version__}; "
                                 "install ai-edge-litert, or pin numpy<2 on this board")
    return Interpreter


class LiteRtRuntime:
    name = "litert"

    def __init__(self, path: Path, threads: int = 1, providers: list[str] | None = None) -> None:
        Interpreter = _litert_interpreter()
        try:
            self.interp = Interpreter(model_path=str(path), num_threads=max(1, threads))
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"LiteRT cannot load {path.name}: {exc}") from None
        ins, outs = self.interp.get_input_details(), self.interp.get_output_details()
        info = lambda d: IOInfo(d["name"], tuple(int(v) for v in d["shape"]), np.dtype(d["dtype"]).name)
        self.inputs, self.outputs = tuple(info(d) for d in ins), tuple(info(d) for d in outs)
        self.input, self.output = self.inputs[0], self.outputs[0]
        self._in = {d["name"]: (d["index"], d["dtype"], d.get("quantization", (0.0, 0))) for d in ins}
        self._outd = {d["name"]: (d["index"], d.get("quantization", (0.0, 0))) for d in outs}
        i, o = ins[0], outs[0]
        self._in_idx, self._out_idx = i["index"], o["index"]
        self._in_dtype = i["dtype"]
        self._in_q = i.get("quantization", (0.0, 0))
        self._out_q = o.get("quantization", (0.0, 0))
        self._set, self._invoke, self._get = self.interp.set_tensor, self.interp.invoke, self.interp.get_tensor

    @staticmethod
    def _quantize(x: np.ndarray, dtype: Any, q: tuple[float, int]) -> np.ndarray:
        """A float input for an int8/uint8 tensor is quantized with the tensor's scale; an input
        already in the tensor's integer dtype (a uint8 image) is passed as it is."""
        scale, zero = q
        if dtype in (np.int8, np.uint8) and scale and x.dtype != dtype:
            info = np.iinfo(dtype)
            return np.clip(np.round(x / scale + zero), info.min, info.max).astype(dtype)
        return x if x.dtype == dtype else x.astype(dtype)

    @staticmethod
    def _dequantize(y: np.ndarray, q: tuple[float, int]) -> np.ndarray:
        scale, zero = q
        if y.dtype in (np.int8, np.uint8) and scale:
            return (y.astype(np.float32) - zero) * scale
        return y

    def run(self, x: np.ndarray) -> np.ndarray:
        self._set(self._in_idx, self._quantize(x, self._in_dtype, self._in_q))
        self._invoke()
        return self._dequantize(self._get(self._out_idx), self._out_q)

    def run_named(self, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        for name, x in feeds.items():
            idx, dtype, q = self._in[name]
            self._set(idx, self._quantize(x, dtype, q))
        self._invoke()
        out = {}
        for name in outputs:
            idx, q = self._outd[name]
            out[name] = self._dequantize(self._get(idx), q)   # get_tensor copies: safe past the next invoke
        return out


#: file suffix → (runtime name, module that must be importable, factory)
RUNTIMES: dict[str, tuple[str, tuple[str, ...], Callable[..., Runtime]]] = {
    ".onnx": ("onnxruntime", ("onnxruntime",), OnnxRuntime),
    ".tflite": ("litert", ("ai_edge_litert", "tflite_runtime"), LiteRtRuntime),
}


def available_runtimes() -> list[str]:
    """Runtimes importable on this board (cheap: no import, only a spec lookup)."""
    out = []
    for name, modules, _ in RUNTIMES.values():
        if any(importlib.util.find_spec(m) is not None for m in modules):
            out.append(name)
    return out


def make_runtime(path: str | Path, threads: int = 1, providers: list[str] | None = None) -> Runtime:
    p = Path(path)
    entry = RUNTIMES.get(p.suffix)
    if entry is None:
        raise ValueError(f"{p.name}: no runtime for '{p.suffix}' files (known: {', '.join(RUNTIMES)})")
    return entry[2](p, threads, providers)
