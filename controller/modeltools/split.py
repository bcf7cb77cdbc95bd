"""Cut a single ONNX graph into backbone + head at a named tensor (``fleetctl model split``).

The backbone is the subgraph from the graph inputs to the cut tensor (onnx.utils.extract_model).
Everything after the cut must be a chain of dense layers — ``MatMul`` + ``Add`` or ``Gemm``,
optionally followed by ``Relu`` (and a final ``Softmax``, which the agent applies itself) —
and becomes ``head.npz`` in the agent's head format.
"""
from __future__ import annotations

from pathlib import Path
import shutil
import tempfile

import numpy as np

from protocol.bundle import check_head, head_bytes, write_manifest
from protocol.lineage import file_sha256


class SplitError(ValueError):
    pass


def _dense_chain(model, start: str) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    head: dict[str, np.ndarray] = {}
    cur, layer = start, 0
    pending_w: np.ndarray | None = None
    while cur not in outputs or pending_w is not None:
        nxt = consumers.get(cur, [])
        if len(nxt) != 1:
            if cur in outputs and pending_w is None:
                break
            raise SplitError(f"tensor {cur!r} feeds {len(nxt)} nodes; only a single dense chain can become a head")
        n = nxt[0]
        if n.op_type == "MatMul":
            w = inits.get(n.input[1])
            if w is None or w.ndim != 2:
                raise SplitError(f"{n.name or n.op_type}: weight is not a 2-D initializer")
            pending_w = w.astype(np.float32)
        elif n.op_type == "Add" and pending_w is not None:
            b = inits.get(n.input[1] if n.input[0] == cur else n.input[0])
            if b is None:
                raise SplitError(f"{n.name or 'Add'}: bias is not an initializer")
            head[f"dense{layer}.weight"], head[f"dense{layer}.bias"] = pending_w, b.reshape(-1).astype(np.float32)
            pending_w, layer = None, layer + 1
        elif n.op_type == "Gemm":
            attrs = {a.name: a for a in n.attribute}
            w, b = inits.get(n.input[1]), inits.get(n.input[2]) if len(n.input) > 2 else None
            if w is None:
                raise SplitError(f"{n.name or 'Gemm'}: weight is not an initializer")
            if "transB" in attrs and attrs["transB"].i:
                w = w.T
            b = np.zeros(w.shape[1], np.float32) if b is None else b
            head[f"dense{layer}.weight"], head[f"dense{layer}.bias"] = w.astype(np.float32), b.astype(np.float32)
            layer += 1
        elif n.op_type == "Relu" and pending_w is None:
            pass
        elif n.op_type == "Softmax" and pending_w is None:
            pass
        else:
            raise SplitError(f"op {n.op_type} after the cut cannot become a head (only MatMul+Add/Gemm, Relu)")
        cur = n.output[0]
    if not head:
        raise SplitError(f"no dense layer after {start!r}")
    return check_head(head)


def split_model(model_path: str | Path, at: str, out: str | Path, name: str = "model", version: str = "1.0.0",
                input_min: float | None = None, input_max: float | None = None, labels: list[str] | None = None) -> Path:
    import onnx
    from onnx import shape_inference
    from onnx.utils import extract_model

    model = shape_inference.infer_shapes(onnx.load(str(model_path)))
    names = {v.name for v in list(model.graph.value_info) + list(model.graph.output)} | {
        o for n in model.graph.node for o in n.output}
    if at not in names:
        raise SplitError(f"no tensor named {at!r} in {Path(model_path).name}")
    head = _dense_chain(model, at)
    inp = model.graph.input[0]
    dims = [d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    out = Path(out)
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-split-"))
    try:
        extract_model(str(model_path), str(tmp / "backbone.onnx"), [inp.name], [at])
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
                             "files": {"backbone.onnx": {"role": "backbone"}, "head.npz": {"role": "head"}},
                             "lineage": {"kind": "built", "parent_version": None,
                                         "source": {"file": Path(model_path).name,
                                                    "sha256": file_sha256(model_path)}}})
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
