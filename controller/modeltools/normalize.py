"""Normalise what ONNX exporters write, so a graph can be cut, quantized and served.

Exporters differ: paddle2onnx writes every weight as a ``Constant`` node (no initializers) and
ends in an ``Identity``; skl2onnx ends in a ``ZipMap`` (a sequence of maps, not a tensor); most
leave image sizes dynamic (``[-1, 3, ?, ?]``). ``normalize`` turns such a graph into one with
initializers, tensor outputs and the sample shape the user gave, folds what is constant once the
shape is fixed (ONNX Runtime's basic graph optimisations, written to a file: only standard ops),
and runs onnx's shape inference. Each change is reported as a note, so the CLI can say what it did.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import os
from pathlib import Path
import tempfile
from typing import Any

import numpy as np


class ModelError(ValueError):
    """A model file we cannot take; the message names the file, tensor or option."""


@dataclass
class Normalized:
    model: Any                    # onnx.ModelProto
    notes: list[str] = field(default_factory=list)


def parse_shape(text: str) -> list[int | None]:
    """``1,3,48,192`` (or ``N,3,48,192``: a dynamic batch) → dims; ModelError naming the text."""
    dims: list[int | None] = []
    for i, part in enumerate(text.replace("x", ",").split(",")):
        part = part.strip()
        if i == 0 and part.upper() in ("N", "?", "-1", "NONE"):
            dims.append(None)
            continue
        try:
            v = int(part)
        except ValueError:
            raise ModelError(f"--input-shape {text!r}: {part!r} is not a positive integer "
                             "(only the first, batch, dimension may be N)") from None
        if v <= 0:
            raise ModelError(f"--input-shape {text!r}: dimensions must be positive")
        dims.append(v)
    return dims


def load_onnx(path: str | Path) -> Any:
    import onnx

    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ModelError(f"{Path(path).name}: not an ONNX model ({type(exc).__name__}: {exc})") from None


def dims_of(vi: Any) -> list[int | None] | None:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]


def _constants_to_initializers(model: Any) -> int:
    from onnx import helper, numpy_helper

    g = model.graph
    keep, n = [], 0
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            a = node.attribute[0]
            arr = None
            if a.name == "value":
                arr = numpy_helper.to_array(a.t)
            elif a.name in ("value_float", "value_int"):
                arr = np.array(helper.get_attribute_value(a), np.float32 if a.name == "value_float" else np.int64)
            elif a.name in ("value_floats", "value_ints"):
                arr = np.array(list(helper.get_attribute_value(a)),
                               np.float32 if a.name == "value_floats" else np.int64)
            if arr is not None:
                g.initializer.append(numpy_helper.from_array(arr, node.output[0]))
                n += 1
                continue
        keep.append(node)
    if n:
        del g.node[:]
        g.node.extend(keep)
    return n


def _rename(model: Any, old: str, new: str) -> None:
    for node in model.graph.node:
        for i, x in enumerate(node.input):
            if x == old:
                node.input[i] = new
        for i, x in enumerate(node.output):
            if x == old:
                node.output[i] = new


def _drop_tails(model: Any) -> list[str]:
    """Trailing Identity → its input becomes the output (same name); ZipMap → the probability tensor."""
    g = model.graph
    notes = []
    graph_inputs = {i.name for i in g.input}
    changed = True
    while changed:
        changed = False
        producers = {o: n for n in g.node for o in n.output}
        for out in g.output:
            n = producers.get(out.name)
            if n is None or n.input[0] in graph_inputs or n.input[0] in {o.name for o in g.output}:
                continue
            if n.op_type == "Identity":
                src = n.input[0]
                g.node.remove(n)
                _rename(model, src, out.name)
                notes.append(f"dropped the trailing Identity before {out.name!r}")
                changed = True
                break
            if n.op_type == "ZipMap":
                src = n.input[0]
                g.node.remove(n)
                _rename(model, src, out.name)
                out.ClearField("type")
                out.type.tensor_type.elem_type = 1  # float probabilities
                for _ in range(2):
                    out.type.tensor_type.shape.dim.add()  # [batch, classes], sizes left to inference
                notes.append(f"replaced ZipMap {out.name!r} (a sequence of maps) by its probability tensor")
                changed = True
                break
    return notes


def _set_input_shapes(model: Any, shapes: dict[str, list[int | None]] | None) -> list[str]:
    g = model.graph
    inits = {i.name for i in g.initializer}
    real = [i for i in g.input if i.name not in inits]
    notes = []
    for name, dims in (shapes or {}).items():
        vi = next((i for i in real if i.name == name), None) if name else (real[0] if real else None)
        if vi is None:
            raise ModelError(f"--input-shape: the model has no input {name!r} (it has {[i.name for i in real]})")
        old = dims_of(vi)
        if old is not None and len(old) != len(dims):
            raise ModelError(f"--input-shape {dims}: input {vi.name!r} has rank {len(old)} ({old})")
        for i, want in enumerate(dims):
            if i > 0 and old is not None and old[i] is not None and want is not None and old[i] != want:
                raise ModelError(f"--input-shape: dimension {i} of {vi.name!r} is fixed at {old[i]} by the model, "
                                 f"not {want}")
        shp = vi.type.tensor_type.shape
        shp.ClearField("dim")
        for want in dims:
            d = shp.dim.add()
            if want is None:
                d.dim_param = "batch"
            else:
                d.dim_value = want
        notes.append(f"input {vi.name!r}: shape {old} → {dims}")
    if notes:
        # shapes derived from the old input shapes are stale: let inference recompute them
        del g.value_info[:]
        for o in g.output:
            if o.type.HasField("tensor_type"):
                for d in o.type.tensor_type.shape.dim:
                    d.Clear()
    return notes


def _ort_fold(model: Any) -> tuple[Any, str | None]:
    """ONNX Runtime's basic (standard-op) optimisations: constant folding, Conv+BN fusion, dead nodes."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgefleet-norm-") as d:
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        onnx.save(model, src)
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        so.optimized_model_filepath = dst
        try:
            ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
            out = onnx.load(dst)
        except Exception as exc:  # noqa: BLE001 - ORT's own exception types
            return model, f"ONNX Runtime cannot load the model ({str(exc).splitlines()[0][:200]})"
    return out, None


def normalize(path: str | Path, input_shapes: dict[str, list[int | None]] | None = None,
              fold: bool = True) -> Normalized:
    """Load and normalise an ONNX model (see the module docstring); ModelError when it cannot be read."""
    import onnx
    from onnx import shape_inference

    model = load_onnx(path)
    res = Normalized(model)
    n = _constants_to_initializers(model)
    if n:
        res.notes.append(f"{n} Constant nodes became initializers")
    res.notes += _drop_tails(model)
    res.notes += _set_input_shapes(model, input_shapes)
    if fold:
        before = len(model.graph.node)
        folded, err = _ort_fold(model)
        if err:
            raise ModelError(f"{Path(path).name}: {err}")
        if len(folded.graph.node) < before:
            res.notes.append(f"folded constants and fused layers: {before} → {len(folded.graph.node)} nodes")
        model = folded
    try:
        model = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError / ValidationError
        res.notes.append(f"shape inference stopped: {str(exc).splitlines()[0][:160]}")
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"{Path(path).name}: the normalised graph is not valid ONNX: "
                         f"{str(exc).splitlines()[0][:200]}") from None
    res.model = model
    return res


def io_specs(model: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Real inputs (not initializers) and outputs as {name, shape, dtype} dicts."""
    from onnx import helper

    def spec(vi: Any) -> dict[str, Any]:
        if vi.type.HasField("tensor_type"):
            dt = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name \
                if vi.type.tensor_type.elem_type else "unknown"
        else:
            dt = vi.type.WhichOneof("value") or "unknown"
        return {"name": vi.name, "shape": dims_of(vi), "dtype": dt}

    inits = {i.name for i in model.graph.initializer}
    return ([spec(i) for i in model.graph.input if i.name not in inits], [spec(o) for o in model.graph.output])


def tensor_shapes(model: Any) -> dict[str, list[int | None] | None]:
    g = model.graph
    return {vi.name: dims_of(vi) for vi in list(g.value_info) + list(g.output) + list(g.input)}


def op_histogram(model: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in model.graph.node:
        k = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        out[k] = out.get(k, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def save(model: Any, path: str | Path) -> None:
    import onnx

    onnx.save(model, str(path))

