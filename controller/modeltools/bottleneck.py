"""A learned bottleneck at the split (BottleFit): ``fleetctl model bottleneck BUNDLE --ratio R``.

At an exit tensor ``T`` [N,C,H,W] of a bundle with early exits, train a 1×1-convolution encoder
C → c = round(R·C) channels (the board: int8 weights, int8 output — the code that travels) and
a 1×1-convolution decoder c → C with ReLU (the worker: float), so the worker can run
decoder + the segments after ``T`` + head. Training is BottleFit's first stage, *head
distillation*: the encoder/decoder pair learns to reproduce the original model's tensor at the
cut (MSE against the teacher's activations on the bundle's data), with the int8 rounding of the
code in the loop (straight-through; the code's scale puts its 99.9th percentile at ±63 of int8's
±127, ~7 bits of entropy that zstd turns into fewer bytes). Initialised by PCA over the channels, then Adam. The result
is measured end to end through the real tail (ONNX Runtime) on the eval set: accuracy and
agreement with the original model; ``--max-drop`` refuses a pair that loses more.

Encoder and decoder go into ONE new bundle version (``bottleneck.id`` names the pair), so the
quality gate, patches and rollouts carry them together.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from protocol.atomicfile import replace_dir
from protocol.bundle import head_forward, load_bundle, softmax, write_manifest
from protocol.exits import pair_id

from .exits import ExitError, _bundle_data, _session, run_chain


class BottleneckError(ValueError):
    """A bottleneck we will not write; the message says why."""


@dataclass(frozen=True)
class BottleneckReport:
    at: str
    channels: int
    ratio: float
    epochs: int
    train_seconds: float
    code_bytes: int
    tensor_bytes_fp32: int
    accuracy_full: float | None
    accuracy_bottleneck: float | None
    agreement: float
    drop_pts: float | None
    training: str = "head distillation at the cut (MSE to the original tensor), int8 code in the loop"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fit(p: np.ndarray, c: int, epochs: int, seed: int, batch: int = 4096, lr: float = 3e-3,
         levels: int = 127) -> dict[str, Any]:
    """Encoder [C,c] + bias, code scale, decoder [c,C] + bias on pixel rows p [m, C]. The scale
    puts the 99.9th percentile of the code at ``levels`` (≤ 127): fewer levels, fewer bits of
    entropy per value for zstd to squeeze out."""
    rng = np.random.default_rng(seed)
    mu = p.mean(0)
    _, _, vt = np.linalg.svd(p[rng.permutation(len(p))[:20000]] - mu, full_matrices=False)
    e = vt[:c].T.astype(np.float32).copy()
    be = (-mu @ e).astype(np.float32)
    d = vt[:c].astype(np.float32).copy()
    bd = mu.astype(np.float32).copy()
    scale = float(np.percentile(np.abs(p @ e + be), 99.9)) / levels or 1.0
    params = [e, be, d, bd]
    m = [np.zeros_like(x) for x in params]
    v = [np.zeros_like(x) for x in params]
    t = 0
    for ep in range(epochs):
        for idx in np.array_split(rng.permutation(len(p)), max(1, len(p) // batch)):
            x = p[idx]
            code = x @ e + be
            q = np.clip(np.round(code / scale), -127, 127) * scale
            pre = q @ d + bd
            out = np.maximum(pre, 0)
            g_out = 2 * (out - x) / len(x)
            g_pre = g_out * (pre > 0)
            g_d, g_bd = q.T @ g_pre, g_pre.sum(0)
            g_q = g_pre @ d.T
            g_code = g_q * (np.abs(code / scale) <= 127)     # straight-through the rounding
            g_e, g_be = x.T @ g_code, g_code.sum(0)
            t += 1
            for k, g in enumerate((g_e, g_be, g_d, g_bd)):
                m[k] = 0.9 * m[k] + 0.1 * g
                v[k] = 0.999 * v[k] + 0.001 * g * g
                params[k] -= lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
        scale = float(np.percentile(np.abs(p[:50000] @ e + be), 99.9)) / levels or scale
    return {"e": e, "be": be, "d": d, "bd": bd, "scale": scale}


def _write_encoder(path: Path, at: str, shape: tuple[int, ...], fit: dict[str, Any]) -> None:
    """at [N,C,H,W] float → code int8 [N,c,H,W]: int8 per-channel weights (QDQ), int8 output."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = fit["e"].T[:, :, None, None]                                   # [c, C, 1, 1]
    ws = np.maximum(np.abs(w).reshape(w.shape[0], -1).max(1), 1e-12) / 127.0
    wq = np.clip(np.round(w / ws[:, None, None, None]), -127, 127).astype(np.int8)
    c = w.shape[0]
    inits = [numpy_helper.from_array(wq, "enc.weight_q"), numpy_helper.from_array(ws.astype(np.float32), "enc.wscale"),
             numpy_helper.from_array(np.zeros(c, np.int8), "enc.wzero"),
             numpy_helper.from_array(fit["be"].astype(np.float32), "enc.bias"),
             numpy_helper.from_array(np.array(fit["scale"], np.float32), "code.scale"),
             numpy_helper.from_array(np.array(0, np.int8), "code.zero")]
    nodes = [helper.make_node("DequantizeLinear", ["enc.weight_q", "enc.wscale", "enc.wzero"], ["enc.weight"], axis=0),
             helper.make_node("Conv", [at, "enc.weight", "enc.bias"], ["code_f"], kernel_shape=[1, 1]),
             helper.make_node("QuantizeLinear", ["code_f", "code.scale", "code.zero"], ["code"])]
    _, C, H, W = shape
    g = helper.make_graph(nodes, "bottleneck_encoder",
                          [helper.make_tensor_value_info(at, TensorProto.FLOAT, ["N", C, H, W])],
                          [helper.make_tensor_value_info("code", TensorProto.INT8, ["N", c, H, W])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _write_decoder(path: Path, shape: tuple[int, ...], fit: dict[str, Any]) -> None:
    """code int8 [N,c,H,W] → decoded float [N,C,H,W] (ReLU, like the tensor it stands for)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = fit["d"].T[:, :, None, None].astype(np.float32)                # [C, c, 1, 1]
    C, c = w.shape[:2]
    inits = [numpy_helper.from_array(np.array(fit["scale"], np.float32), "code.scale"),
             numpy_helper.from_array(np.array(0, np.int8), "code.zero"),
             numpy_helper.from_array(w, "dec.weight"), numpy_helper.from_array(fit["bd"].astype(np.float32), "dec.bias")]
    nodes = [helper.make_node("DequantizeLinear", ["code", "code.scale", "code.zero"], ["code_f"]),
             helper.make_node("Conv", ["code_f", "dec.weight", "dec.bias"], ["dec_pre"], kernel_shape=[1, 1]),
             helper.make_node("Relu", ["dec_pre"], ["decoded"])]
    _, _, H, W = shape
    g = helper.make_graph(nodes, "bottleneck_decoder",
                          [helper.make_tensor_value_info("code", TensorProto.INT8, ["N", c, H, W])],
                          [helper.make_tensor_value_info("decoded", TensorProto.FLOAT, ["N", C, H, W])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet")
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def add_bottleneck(bundle_dir: str | Path, out: str | Path, ratio: float, data: str | Path | None = None,
                   at: str | None = None, epochs: int = 4, seed: int = 0, max_drop: float = 0.01,
                   force: bool = False, levels: int = 63) -> BottleneckReport:
    """A new bundle version at ``out`` with an encoder/decoder pair at exit tensor ``at``."""
    if not 0 < ratio <= 1:
        raise BottleneckError(f"--ratio must be in (0, 1], got {ratio}")
    src = load_bundle(bundle_dir)
    m = src.manifest
    if not m.exits:
        raise BottleneckError("the bundle has no exits: add them first (fleetctl model exits --exit TENSOR); "
                              "the bottleneck sits at an exit tensor")
    if m.bottleneck is not None:
        raise BottleneckError("the bundle already has a bottleneck: train the new one on the original bundle")
    tensors = [e.tensor for e in m.exits]
    at = at or tensors[-1]
    if at not in tensors:
        raise BottleneckError(f"--at {at!r} is not an exit tensor; the exits are {tensors}")
    k = tensors.index(at)
    try:
        x = _bundle_data(src, data)
    except ExitError as exc:
        raise BottleneckError(str(exc)) from None
    t0 = time.time()
    segs = [src.path / s for s in m.segments]
    z = run_chain(segs[: k + 1], x)[-1]
    if z.ndim != 4:
        raise BottleneckError(f"the tensor at {at!r} is {list(z.shape[1:])}; a bottleneck needs [C,H,W]")
    _, C, H, W = z.shape
    c = max(1, int(round(ratio * C)))
    rows = z.transpose(0, 2, 3, 1).reshape(-1, C).astype(np.float32)
    if not 2 <= levels <= 127:
        raise BottleneckError(f"--levels must be in [2, 127], got {levels}")
    fit = _fit(rows, c, epochs, seed, levels=levels)
    secs = time.time() - t0
    out = Path(out)
    if out.exists() and not force:
        raise BottleneckError(f"{out} exists (use --force to replace it)")
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src.path, tmp)
    try:
        _write_encoder(tmp / "encoder.onnx", at, z.shape, fit)
        _write_decoder(tmp / "decoder.onnx", z.shape, fit)
        ev = src.npz("eval")
        xe = ev["x"] if ev is not None else x[:500]
        full_outs = run_chain(segs, xe)
        full = softmax(head_forward(src.head, full_outs[-1])) if src.head is not None else softmax(full_outs[-1])
        enc, dec = _session(tmp / "encoder.onnx"), _session(tmp / "decoder.onnx")
        code = enc.run(None, {at: full_outs[k]})[0]
        h = dec.run(None, {"code": code})[0]
        for s in segs[k + 1:]:
            sess = _session(s)
            h = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: h[i:i + 256]})[0]
                                for i in range(0, len(h), 256)])
        bott = softmax(head_forward(src.head, h)) if src.head is not None else softmax(h)
        agree = float((bott.argmax(1) == full.argmax(1)).mean())
        acc_f = acc_b = drop = None
        if ev is not None and "y" in ev:
            acc_f = float((full.argmax(1) == ev["y"]).mean())
            acc_b = float((bott.argmax(1) == ev["y"]).mean())
            drop = round((acc_f - acc_b) * 100, 3)
        rep = BottleneckReport(at, c, round(c / C, 4), epochs, round(secs, 2), int(c * H * W), int(C * H * W * 4),
                               None if acc_f is None else round(acc_f, 4), None if acc_b is None else round(acc_b, 4),
                               round(agree, 4), drop)
        if drop is not None and drop > max_drop * 100:
            raise BottleneckError(f"the bottleneck loses {drop:.2f} accuracy points (> --max-drop {max_drop:.2%}); "
                                  f"try a larger --ratio or more --epochs")
        man = json.loads((tmp / "manifest.json").read_text())
        man["files"]["encoder.onnx"] = {"role": "encoder"}
        man["files"]["decoder.onnx"] = {"role": "decoder"}
        bb = m.files[str(m.file("backbone"))].sha256
        man["bottleneck"] = {"at": at, "encoder": "encoder.onnx", "decoder": "decoder.onnx",
                             "id": pair_id(_sha(tmp / "encoder.onnx"), _sha(tmp / "decoder.onnx"), bb, at),
                             "channels": c, "ratio": round(c / C, 6), "scale": fit["scale"], "codec": "int8+zstd",
                             "code_shape": [c, H, W]}
        man.setdefault("metrics", {})["bottleneck"] = rep.to_dict()
        write_manifest(tmp, man)
        load_bundle(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rep
