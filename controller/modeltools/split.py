"""Cut a single ONNX graph into backbone + head at a named tensor (``fleetctl model split`` / ``import --cut``).

The backbone is the subgraph from the graph inputs to the cut tensor. Everything after the cut
must be a chain of dense layers — ``MatMul`` + ``Add`` or ``Gemm``, optionally followed by
``Relu`` (and a final ``Softmax``, which the agent applies itself) — and becomes ``head.npz`` in
the agent's head format. Quantize-then-split graphs are taken too: ``QuantizeLinear`` →
``DequantizeLinear`` pairs on the path are stepped over and weights given as
``DequantizeLinear(int8 initializer)`` are dequantized. ``cut_candidates`` lists every tensor a
head can start from; ``auto_cut`` picks the last feature layer (a one-layer head over it).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
import shutil
import tempfile
from typing import Any

import numpy as np

from protocol.bundle import check_head, head_bytes, write_manifest


class SplitError(ValueError):
    pass


@dataclass(frozen=True)
class Candidate:
    tensor: str
    shape: list[int | None] | None
    head_layers: int
    features: int
    classes: int

    def to_dict(self) -> dict[str, Any]:
        return {"tensor": self.tensor, "shape": self.shape, "head_layers": self.head_layers,
                "features": self.features, "classes": self.classes}


class _Graph:
    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        self.consumers: dict[str, list] = {}
        self.producer: dict[str, Any] = {}
        for n in model.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
            for o in n.output:
                self.producer[o] = n
        self.outputs = {o.name for o in model.graph.output}

    def const(self, name: str) -> np.ndarray | None:
        """An initializer, or an initializer through DequantizeLinear (a quantized weight)."""
        if name in self.inits:
            return self.inits[name]
        n = self.producer.get(name)
        if n is not None and n.op_type == "DequantizeLinear" and n.input[0] in self.inits:
            q = self.inits[n.input[0]].astype(np.float32)
            scale = self.const(n.input[1])
            zero = self.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if scale is None:
                return None
            axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim == 1 and scale.size > 1:
                shape[axis] = scale.size
            z = 0.0 if zero is None else zero.astype(np.float32).reshape(shape if zero.size > 1 else ())
            return (q - z) * scale.astype(np.float32).reshape(shape if scale.size > 1 else ())
        return None


def _dense_chain(g: _Graph, start: str) -> dict[str, np.ndarray]:
    head: dict[str, np.ndarray] = {}
    cur, layer = start, 0
    pending_w: np.ndarray | None = None
    while cur not in g.outputs or pending_w is not None:
        nxt = g.consumers.get(cur, [])
        if len(nxt) != 1:
            raise SplitError(f"tensor {cur!r} feeds {len(nxt)} nodes; only a single dense chain can become a head")
        n = nxt[0]
        if n.op_type == "MatMul" and n.input[0] == cur:
            w = g.const(n.input[1])
            if w is None or w.ndim != 2:
                raise SplitError(f"{n.name or n.op_type}: weight is not a 2-D initializer")
            if pending_w is not None:
                raise SplitError(f"{n.name or 'MatMul'}: two MatMuls with no bias between them")
            pending_w = w.astype(np.float32)
        elif n.op_type == "Add" and pending_w is not None:
            b = g.const(n.input[1] if n.input[0] == cur else n.input[0])
            if b is None:
                raise SplitError(f"{n.name or 'Add'}: bias is not an initializer")
            head[f"dense{layer}.weight"], head[f"dense{layer}.bias"] = pending_w, b.reshape(-1).astype(np.float32)
            pending_w, layer = None, layer + 1
        elif n.op_type == "Gemm" and n.input[0] == cur and pending_w is None:
            attrs = {a.name: a for a in n.attribute}
            w = g.const(n.input[1])
            b = g.const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if w is None:
                raise SplitError(f"{n.name or 'Gemm'}: weight is not an initializer")
            if "transA" in attrs and attrs["transA"].i:
                raise SplitError(f"{n.name or 'Gemm'}: transA is not a dense layer over features")
            if "transB" in attrs and attrs["transB"].i:
                w = w.T
            alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
            beta = attrs["beta"].f if "beta" in attrs else 1.0
            b = np.zeros(w.shape[1], np.float32) if b is None else np.broadcast_to(b.reshape(-1), (w.shape[1],)) * beta
            head[f"dense{layer}.weight"] = (w * alpha).astype(np.float32)
            head[f"dense{layer}.bias"] = np.asarray(b, np.float32)
            layer += 1
        elif n.op_type in ("Relu", "Softmax", "Identity") and pending_w is None:
            if n.op_type == "Softmax" and n.output[0] not in g.outputs and not _only_tail(g, n.output[0]):
                raise SplitError("Softmax in the middle of the head")
        elif n.op_type in ("QuantizeLinear", "DequantizeLinear") and pending_w is None:
            pass  # quantize-then-split: activations' Q/DQ pairs carry no weights
        else:
            raise SplitError(f"op {n.op_type} after the cut cannot become a head (only MatMul+Add/Gemm, Relu)")
        cur = n.output[0]
    if not head:
        raise SplitError(f"no dense layer after {start!r}")
    try:
        return check_head(head)
    except ValueError as exc:
        raise SplitError(f"the layers after {start!r} do not chain: {exc}") from None


def _only_tail(g: _Graph, name: str) -> bool:
    """Only Q/DQ/Identity between this tensor and a graph output."""
    cur = name
    while cur not in g.outputs:
        nxt = g.consumers.get(cur, [])
        if len(nxt) != 1 or nxt[0].op_type not in ("QuantizeLinear", "DequantizeLinear", "Identity"):
            return False
        cur = nxt[0].output[0]
    return True


def dense_head(model: Any, at: str) -> dict[str, np.ndarray]:
    return _dense_chain(_Graph(model), at)


def cut_candidates(model: Any) -> list[Candidate]:
    """Every tensor after which the graph is a dense head, nearest the output first."""
    from .normalize import tensor_shapes

    g = _Graph(model)
    shapes = tensor_shapes(model)
    out: list[Candidate] = []
    for n in reversed(list(model.graph.node)):
        for t in n.output:
            if t in g.outputs:
                continue
            try:
                head = _dense_chain(g, t)
            except SplitError:
                continue
            k = len(head) // 2
            out.append(Candidate(t, shapes.get(t), k, int(head["dense0.weight"].shape[0]),
                                 int(head[f"dense{k - 1}.bias"].shape[0])))
    # a tensor and its Q/DQ/Relu copies give the same head: keep the first (nearest the output) per depth
    seen: set[tuple[int, int]] = set()
    uniq = []
    for c in out:
        if (c.head_layers, c.features) not in seen:
            seen.add((c.head_layers, c.features))
            uniq.append(c)
    return uniq


def auto_cut(model: Any) -> Candidate:
    """The last feature layer: the input of the final dense layer (a one-layer head)."""
    cands = cut_candidates(model)
    if not cands:
        raise SplitError("no tensor after which the graph is only dense layers (MatMul+Add/Gemm, Relu, Softmax): "
                         "import it whole (no --cut), or name a tensor with --cut")
    return min(cands, key=lambda c: (c.head_layers, -len(c.tensor)))


def extract_backbone(model: Any, at: str, features: int) -> Any:
    """The subgraph inputs → ``at`` (onnx's Extractor), with a typed output even when shape
    inference could not follow the graph that far."""
    from onnx import TensorProto, helper
    from onnx.utils import Extractor

    g = model.graph
    inits = {i.name for i in g.initializer}
    names = {vi.name for vi in list(g.value_info) + list(g.output) + list(g.input)}
    if at not in names:
        g.value_info.append(helper.make_tensor_value_info(at, TensorProto.FLOAT, [None, features]))
    inputs = [i.name for i in g.input if i.name not in inits]
    try:
        return Extractor(model).extract_model(inputs, [at])
    except Exception as exc:  # noqa: BLE001 - onnx raises plain exceptions here
        raise SplitError(f"cannot extract the backbone up to {at!r}: {str(exc).splitlines()[0][:200]}") from None


def split_model(model_path: str | Path, at: str, out: str | Path, name: str = "model", version: str = "1.0.0",
                input_min: float | None = None, input_max: float | None = None, labels: list[str] | None = None) -> Path:
    import onnx

    from .normalize import ModelError, normalize

    try:
        model = normalize(model_path).model
    except ModelError as exc:
        raise SplitError(str(exc)) from None
    g = _Graph(model)
    if at not in g.consumers and at not in g.outputs:
        raise SplitError(f"no tensor named {at!r} in {Path(model_path).name}")
    head = _dense_chain(g, at)
    inits = {i.name for i in model.graph.initializer}
    inp = next(i for i in model.graph.input if i.name not in inits)
    dims = [d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-split-"))
    try:
        onnx.save(extract_backbone(model, at, int(head["dense0.weight"].shape[0])), str(tmp / "backbone.onnx"))
        (tmp / "head.npz").write_bytes(head_bytes(head))
        n_out = head[f"dense{len(head) // 2 - 1}.bias"].shape[0]
        spec = {"name": inp.name, "shape": [None] + [d or None for d in dims[1:]], "dtype": "float32"}
        if input_min is not None:
            spec["min"] = input_min
        if input_max is not None:
            spec["max"] = input_max
        write_manifest(tmp, {"name": name, "version": version, "input": spec,
                             "features": {"name": at, "shape": [None, int(head["dense0.weight"].shape[0])]},
                             "labels": labels or [str(i) for i in range(n_out)],
                             "files": {"backbone.onnx": {"role": "backbone"}, "head.npz": {"role": "head"}}})
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
