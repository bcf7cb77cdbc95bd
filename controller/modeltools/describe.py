"""What is in a raw model file (``fleetctl model inspect MODEL.onnx|MODEL.tflite``), and bundle edits.

``describe_file``: inputs and outputs with shapes and dtypes, the op histogram, and (ONNX) the
tensors a head could start from — what a user needs to choose ``--cut`` and ``--input-shape``.
``set_backbone`` / ``add_data``: change one file of a bundle and rewrite its manifest atomically
(``protocol.bundle.write_manifest``), then re-verify it.
"""
from __future__ import annotations

from pathlib import Path
import shutil
from typing import Any

import numpy as np

from protocol.bundle import BundleError, load_bundle, write_manifest


def describe_file(path: str | Path, input_shape: list[int | None] | None = None) -> dict[str, Any]:
    p = Path(path)
    if p.suffix.lower() == ".tflite":
        from .litert import LiteRtModel

        m = LiteRtModel(p)
        ins, outs = m.io()
        return {"file": p.name, "format": "tflite", "bytes": p.stat().st_size, "inputs": ins, "outputs": outs,
                "ops": m.ops(), "candidates": [], "notes": ["a .tflite model is imported whole (no head)"]}
    if p.suffix.lower() != ".onnx":
        raise ValueError(f"{p.name}: not a .onnx or .tflite file")
    from .normalize import io_specs, load_onnx, normalize, op_histogram
    from .quantize import quiet_ort
    from .split import auto_cut, cut_candidates, SplitError

    raw = load_onnx(p)
    raw_ins, raw_outs = io_specs(raw)
    info: dict[str, Any] = {"file": p.name, "format": "onnx", "bytes": p.stat().st_size,
                            "opset": {o.domain or "ai.onnx": o.version for o in raw.opset_import},
                            "producer": f"{raw.producer_name} {raw.producer_version}".strip(),
                            "inputs": raw_ins, "outputs": raw_outs, "ops": op_histogram(raw),
                            "initializers": len(raw.graph.initializer)}
    shapes = {"": input_shape} if input_shape else None
    with quiet_ort():
        try:
            norm = normalize(p, shapes)
        except ValueError as exc:
            info.update(candidates=[], notes=[f"cannot normalise: {exc}"])
            return info
    info["notes"] = norm.notes
    cands = cut_candidates(norm.model)
    info["candidates"] = [c.to_dict() for c in cands]
    try:
        info["auto_cut"] = auto_cut(norm.model).tensor
    except SplitError:
        info["auto_cut"] = None
    dyn = [i["name"] for i in raw_ins if i["shape"] is None or any(d is None for d in i["shape"][1:])]
    if dyn and not input_shape:
        info["notes"].append(f"dynamic dimensions in {dyn}: give --input-shape to import")
    return info


def set_backbone(bundle: str | Path, model: str | Path) -> dict[str, Any]:
    """Put another backbone (e.g. a quantized one) into a bundle; the manifest is rewritten atomically."""
    b = load_bundle(bundle)
    m = Path(model)
    old = b.manifest.file("backbone")
    if m.suffix != Path(str(old)).suffix:
        raise BundleError(f"{m.name}: the bundle's backbone is a {Path(str(old)).suffix} file")
    d = dict(b.manifest.raw)
    files = {k: dict(v) for k, v in d["files"].items()}
    name = str(old)
    tmp = b.path / f".{name}.new"
    shutil.copy(m, tmp)
    tmp.replace(b.path / name)
    out: dict[str, Any] = {"backbone": name, "bytes": (b.path / name).stat().st_size}
    ref = b.npz("reference")
    if ref is not None:
        # the reference outputs are this backbone's from now on; say how far they moved
        from .importer import _reference, _runner

        feeds = [{_name(b): xi.reshape([1] + list(man_shape(b))[1:])} for xi in ref["x"]]
        probs = _reference(feeds, b.head, _runner(b.path / name))
        rname = str(b.manifest.file("reference"))
        rtmp = b.path / f".{rname}.new.npz"
        np.savez(rtmp, x=ref["x"], probs=probs)
        rtmp.replace(b.path / rname)
        out.update(reference_agreement=float((probs.argmax(1) == ref["probs"].argmax(1)).mean()),
                   reference_max_prob_diff=round(float(np.abs(probs - ref["probs"]).max()), 6))
    d["files"] = files
    write_manifest(b.path, d)
    return out


def man_shape(b: Any) -> list[int | None]:
    return [1] + [d for d in b.manifest.input.shape[1:]]


def add_data(bundle: str | Path, role: str, data: str | Path, min_agreement: float = 1.0,
             max_prob_diff: float = 0.05, max_drop: float = 0.02) -> dict[str, Any]:
    """Add a reference set (x; probs computed by the bundle's own model) or an eval set (x, y)."""
    from .importer import ModelImportError, _reference, _runner, load_data

    if role not in ("reference", "eval"):
        raise ValueError(f"role {role!r}: reference or eval")
    b = load_bundle(bundle)
    man = b.manifest
    ins = [s.to_dict() for s in (man.inputs or (man.input,))]
    if len(ins) != 1:
        raise ValueError("reference/eval sets are for single-input bundles")
    ins[0]["shape"] = [1] + list(ins[0]["shape"][1:])
    try:
        feeds, y = load_data(data, ins)
    except ModelImportError as exc:
        raise ValueError(str(exc)) from None
    run = _runner(b.backbone_path)
    feeds = [{_name(b): v for v in f.values()} for f in feeds]
    probs = _reference(feeds, b.head, run)
    x = np.stack([next(iter(f.values()))[0] for f in feeds])
    d = dict(man.raw)
    files = {k: dict(v) for k, v in d["files"].items()}
    fname = f"{role}.npz"
    tmp = b.path / f".{fname}.new.npz"
    if role == "reference":
        np.savez(tmp, x=x, probs=probs)
        d["reference"] = {"file": fname, "min_agreement": min_agreement, "max_prob_diff": max_prob_diff}
        out: dict[str, Any] = {"samples": len(x)}
    else:
        if y is None:
            raise ValueError(f"{Path(data).name}: an eval set needs labels (an .npz with x and y)")
        acc = float((probs.argmax(1) == y).mean())
        np.savez(tmp, x=x, y=y)
        d["eval"] = {"file": fname, "baseline_accuracy": round(acc, 5), "max_accuracy_drop": max_drop}
        out = {"samples": len(x), "accuracy": round(acc, 5)}
    tmp.replace(b.path / fname)
    files[fname] = {"role": role}
    d["files"] = files
    write_manifest(b.path, d)
    return out


def _name(b: Any) -> str:
    """The backbone's real input name (a manifest may carry a generic one)."""
    p = b.backbone_path
    if p.suffix == ".tflite":
        from .litert import LiteRtModel

        return LiteRtModel(p).io()[0][0]["name"]
    from .quantize import session

    return session(p).get_inputs()[0].name

