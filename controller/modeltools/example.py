"""``fleetctl model build-example``: a real small bundle from data that ships offline.

scikit-learn's bundled ``load_digits`` (8×8 images, 10 classes) trains an MLP in numpy;
its first layers become the backbone (exported to ONNX, statically quantized to int8
with calibration samples), its last layer the float head. The manifest records fp32 vs
int8 size and accuracy, reference inputs with their expected outputs (health check) and
a small labelled evaluation set (quality gate).
"""
from __future__ import annotations

from dataclasses import dataclass
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from protocol.atomicfile import replace_dir
from protocol.bundle import head_bytes, load_bundle, softmax, write_manifest

from .mlp import accuracy, forward, init_mlp, train_mlp
from .onnx_export import dense_to_onnx, quantize_static_int8

SIZES = {"small": {"hidden": (512, 512), "features": 64, "head_hidden": ()},
         "large": {"hidden": (512, 512), "features": 64, "head_hidden": (256,)}}


@dataclass(frozen=True)
class BuildReport:
    path: str
    size: str
    fp32_bytes: int
    int8_bytes: int
    fp32_accuracy: float
    int8_accuracy: float
    head_accuracy: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {
            "int8_size_ratio": round(self.fp32_bytes / max(1, self.int8_bytes), 3),
            "int8_accuracy_drop_pts": round(100 * (self.fp32_accuracy - self.int8_accuracy), 3)}


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as float32 [n, 64] in 0..16, stratified 80/20 split (deterministic)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    tr, te = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(round(0.8 * len(idx)))
        tr += list(idx[:cut])
        te += list(idx[cut:])
    tr, te = rng.permutation(tr), rng.permutation(te)
    return x[tr], y[tr], x[te], y[te]


def _onnx_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def build_example(out: str | Path, size: str = "small", seed: int = 0, epochs: int = 40,
                  version: str = "1.0.0", name: str = "digits") -> BuildReport:
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}")
    for noisy in ("onnxruntime", "root"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    t0 = time.time()
    spec = SIZES[size]
    out = Path(out)
    rng = np.random.default_rng(seed)
    xtr, ytr, xte, yte = digits_split(seed)
    scale = np.float32(1 / 16)  # the graph sees 0..1; the API takes the dataset's natural 0..16
    sizes = [64, *spec["hidden"], spec["features"], 10]
    layers = init_mlp(sizes, rng)
    train_mlp(layers, xtr * scale, ytr, epochs, rng, lr=2e-3)
    fp32_acc = accuracy(forward(layers, xte * scale)[0], yte)
    back_layers = [(w.copy(), b.copy()) for w, b in layers[:-1]]
    back_layers[0] = (back_layers[0][0] * scale, back_layers[0][1])  # fold the input scaling into layer 0
    head_layers = [layers[-1]]

    work = Path(tempfile.mkdtemp(prefix="edgefleet-build-"))
    try:
        fp32 = work / "backbone_fp32.onnx"
        dense_to_onnx(back_layers, fp32, 64, relu_last=True)
        int8 = work / "backbone.onnx"
        calib = xtr[rng.permutation(len(xtr))[:256]]
        quantize_static_int8(fp32, int8, calib)
        sess = _onnx_session(int8)
        ftr = np.concatenate([sess.run(None, {"input": xtr[i:i + 256]})[0] for i in range(0, len(xtr), 256)])
        fte = sess.run(None, {"input": xte})[0]
        if spec["head_hidden"]:
            # the offload worker's bigger head, trained on the int8 backbone's own features
            head_layers = init_mlp([spec["features"], *spec["head_hidden"], 10], rng)
            train_mlp(head_layers, ftr, ytr, epochs, rng, lr=1e-3)
        int8_acc = accuracy(forward(head_layers, fte)[0], yte)
        head = {}
        for i, (w, b) in enumerate(head_layers):
            head[f"dense{i}.weight"], head[f"dense{i}.bias"] = w.astype(np.float32), b.astype(np.float32)
        tmp_out = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp_out, ignore_errors=True)
        tmp_out.mkdir(parents=True)
        shutil.copy(int8, tmp_out / "backbone.onnx")
        (tmp_out / "head.npz").write_bytes(head_bytes(head))
        ref_x = xte[:16]
        ref_p = softmax(forward(head_layers, sess.run(None, {"input": ref_x})[0])[0])
        np.savez(tmp_out / "reference.npz", x=ref_x, probs=ref_p.astype(np.float32))
        np.savez(tmp_out / "eval.npz", x=xte[:200], y=yte[:200])
        eval_acc = accuracy(forward(head_layers, fte[:200])[0], yte[:200])
        manifest = {
            "name": name, "version": version, "parent_version": None, "created": round(time.time(), 3),
            "input": {"name": "input", "shape": [None, 64], "dtype": "float32", "min": 0.0, "max": 16.0},
            "features": {"name": "features", "shape": [None, spec["features"]], "dtype": "float32"},
            "labels": [str(i) for i in range(10)],
            "files": {"backbone.onnx": {"role": "backbone"}, "head.npz": {"role": "head"},
                      "reference.npz": {"role": "reference"}, "eval.npz": {"role": "eval"}},
            "metrics": {"fp32_accuracy": round(fp32_acc, 4), "int8_accuracy": round(int8_acc, 4),
                        "fp32_backbone_bytes": fp32.stat().st_size, "int8_backbone_bytes": int8.stat().st_size,
                        "dataset": "sklearn load_digits, stratified 80/20, seed %d" % seed},
            "reference": {"file": "reference.npz", "min_agreement": 1.0, "max_prob_diff": 0.05},
            "eval": {"file": "eval.npz", "baseline_accuracy": round(eval_acc, 4), "max_accuracy_drop": 0.02},
            "lineage": built_lineage(fp32, f"sklearn load_digits seed {seed} ({size})", calib, tmp_out / "eval.npz"),
        }
        write_manifest(tmp_out, manifest)
        load_bundle(tmp_out)  # never hand out a bundle we could not serve
        replace_dir(tmp_out, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return BuildReport(str(out), size, fp32.stat().st_size if fp32.exists() else manifest["metrics"]["fp32_backbone_bytes"],
                       manifest["metrics"]["int8_backbone_bytes"], round(fp32_acc, 4), round(int8_acc, 4),
                       round(eval_acc, 4), round(time.time() - t0, 2))


def built_lineage(source: Path, what: str, calibration: np.ndarray | None, eval_file: Path | None) -> dict:
    """The ``lineage`` of a model built or imported here: its source file's hash and the hashes of
    the calibration samples (as float32 bytes) and the eval file (protocol/lineage.py)."""
    import hashlib

    from protocol.lineage import file_sha256

    return {"kind": "built", "parent_version": None, "source": {"file": what, "sha256": file_sha256(source)},
            "calibration_sha256": (hashlib.sha256(np.ascontiguousarray(calibration, np.float32).tobytes()).hexdigest()
                                   if calibration is not None else None),
            "eval_sha256": file_sha256(eval_file) if eval_file is not None else None}


def write_replay(out_dir: str | Path, seed: int = 0, n: int | None = None) -> tuple[Path, Path]:
    """The held-out digits as replay files (x.npy float32 [n, 64], y.npy int64) for agents and tests."""
    _, _, xte, yte = digits_split(seed)
    if n is not None:
        xte, yte = xte[:n], yte[:n]
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "digits_x.npy", xte)
    np.save(d / "digits_y.npy", yte)
    return d / "digits_x.npy", d / "digits_y.npy"


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(build_example(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "small").to_dict(), indent=2))


def derive_bundle(src: str | Path, out: str | Path, version: str, head: dict[str, np.ndarray],
                  lineage: dict | None = None) -> Path:
    """A new version of an ONNX bundle with another head: same backbone bytes, the head and the
    reference outputs rewritten, ``parent_version`` = the source's version. This is what a
    fine-tuned or federated head becomes before it is shipped as a (head-only) patch."""
    from protocol.bundle import check_head, head_forward

    src, out = Path(src), Path(out)
    m = json.loads((src / "manifest.json").read_text())
    head = check_head(head)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    head_name = next(n for n, e in m["files"].items() if e.get("role") == "head")
    (tmp / head_name).write_bytes(head_bytes(head))
    ref_name = next((n for n, e in m["files"].items() if e.get("role") == "reference"), None)
    if ref_name:
        bb = next(n for n, e in m["files"].items() if e.get("role") == "backbone")
        with np.load(tmp / ref_name, allow_pickle=False) as z:
            ref_x = z["x"]
        feats = _onnx_session(tmp / bb).run(None, {"input": ref_x.astype(np.float32)})[0]
        from protocol.npzdelta import npz_bytes

        # canonical bytes: a patch to this version carries the new probabilities only, not the inputs
        (tmp / ref_name).write_bytes(npz_bytes({"x": ref_x, "probs": softmax(head_forward(head, feats))
                                                .astype(np.float32)}))
    from protocol.lineage import validate
    from protocol.patch import bundle_id

    parent = {"parent_version": m.get("version"), "parent_sha256": bundle_id(src)}
    m.update(version=version, parent_version=m.get("version"), created=round(time.time(), 3),
             lineage=validate({"kind": "derived", **(lineage or {}), **parent}))
    write_manifest(tmp, m)
    load_bundle(tmp)
    replace_dir(tmp, out)
    return out
