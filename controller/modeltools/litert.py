"""A ``.tflite`` model as the controller's tools see it: IO, op histogram, a float-in/float-out run.

Uses LiteRT (``ai-edge-litert``), as the agent does; a quantized tensor (scale ≠ 0) is fed and read
as float32 through its own scale and zero point, like ``agent.serving.runtimes.LiteRtRuntime``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ValueError("LiteRT is not installed: pip install 'edgefleet[litert]'") from None
    return Interpreter


class LiteRtModel:
    def __init__(self, path: str | Path) -> None:
        Interpreter = _interpreter()
        self.path = Path(path)
        try:
            self.interp = Interpreter(model_path=str(path), num_threads=1)
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ValueError(f"{self.path.name}: LiteRT cannot load it ({str(exc).splitlines()[0][:200]})") from None

    def io(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        def spec(d: dict[str, Any]) -> dict[str, Any]:
            sig = d.get("shape_signature")
            dims = sig if sig is not None and len(sig) else d["shape"]
            q = d.get("quantization", (0.0, 0))
            return {"name": d["name"], "shape": [int(x) if x > 0 else None for x in dims],
                    "dtype": np.dtype(d["dtype"]).name, "quantized": bool(q and q[0]),
                    "quantization": [float(q[0]), int(q[1])] if q and q[0] else None}

        return ([spec(d) for d in self.interp.get_input_details()],
                [spec(d) for d in self.interp.get_output_details()])

    def ops(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            details = self.interp._get_ops_details()  # noqa: SLF001 - the only op listing LiteRT offers
        except AttributeError:
            return out
        for op in details:
            k = str(op.get("op_name", "?"))
            out[k] = out.get(k, 0) + 1
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        ins = self.interp.get_input_details()
        for d in ins:
            x = feed.get(d["name"])
            if x is None:
                x = next(iter(feed.values())) if len(ins) == 1 else None
            if x is None:
                raise ValueError(f"no value for input {d['name']!r}")
            scale, zero = d.get("quantization", (0.0, 0))
            if np.dtype(d["dtype"]) in (np.int8, np.uint8) and scale:
                info = np.iinfo(d["dtype"])
                x = np.clip(np.round(x / scale + zero), info.min, info.max)
            self.interp.set_tensor(d["index"], np.asarray(x).reshape(d["shape"]).astype(d["dtype"]))
        self.interp.invoke()
        outs = []
        for d in self.interp.get_output_details():
            y = self.interp.get_tensor(d["index"])
            scale, zero = d.get("quantization", (0.0, 0))
            if y.dtype in (np.int8, np.uint8) and scale:
                y = (y.astype(np.float32) - zero) * scale
            outs.append(y)
        return outs
