"""A small image CNN the project builds itself: synthetic shapes, trained in numpy, exported to ONNX.

Why: early exits and a learned bottleneck only mean something on a model whose raw input is
bigger than its intermediate tensors and whose layers cost real compute; the digits MLP is
neither. The data is generated deterministically (8 shapes on a noisy background, random colour,
size, position, contrast and noise: some images are easy, some hard), so nothing is downloaded.

The network (NCHW inside, uint8 HWC image in, like a camera frame)::

    image uint8 [N,32,32,3] → /255 → conv3x3/2 16 → block1 [N,16,16,16]
      → conv3x3/2 32 → block2 [N,32,8,8] → conv3x3/2 32 → block3 [N,32,4,4]
      → conv3x3 64 → block4 → global average pool → features [N,64] → head (npz) → 8 classes

Training: plain minibatch Adam on cross-entropy with im2col convolutions (no torch).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from protocol.atomicfile import replace_dir

SHAPES = ("disk", "square", "triangle", "plus", "ring", "diamond", "bar", "cross")
#: (in channels, out channels, stride) of each 3x3 convolution, padding 1
LAYERS = ((3, 16, 2), (16, 32, 2), (32, 32, 2), (32, 64, 1))
BLOCKS = tuple(f"block{i + 1}" for i in range(len(LAYERS)))
SIZE = 32


# -- data ----------------------------------------------------------------------------------------
def _mask(k: int, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    ax, ay = np.abs(dx), np.abs(dy)
    if k == 0:
        return dx * dx + dy * dy <= r * r
    if k == 1:
        return np.maximum(ax, ay) <= 0.8 * r
    if k == 2:
        return (dy >= -r) & (dy <= 0.8 * r) & (ax <= (dy + r) * 0.55)
    if k == 3:
        return ((ax <= r / 3) & (ay <= r)) | ((ay <= r / 3) & (ax <= r))
    if k == 4:
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    if k == 5:
        return ax + ay <= r
    if k == 6:
        return (ay <= r / 4) & (ax <= r)
    return ((np.abs(dx - dy) <= r / 3) | (np.abs(dx + dy) <= r / 3)) & (np.maximum(ax, ay) <= 0.8 * r)


def make_shapes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images uint8 [n,32,32,3] and labels int64 [n], the same for the same seed."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    x = np.empty((n, SIZE, SIZE, 3), np.uint8)
    y = rng.integers(0, len(SHAPES), n)
    for i in range(n):
        bg = rng.uniform(70, 185, 3)
        contrast = rng.uniform(60, 140) * rng.choice((-1.0, 1.0))
        r = rng.uniform(6.0, 13.0)
        cx, cy = rng.uniform(r, SIZE - r, 2)
        m = _mask(int(y[i]), xx - cx, yy - cy, r).astype(np.float32)
        noise = rng.normal(0, rng.uniform(2, 40), (SIZE, SIZE, 3))
        img = bg + m[..., None] * contrast + noise
        x[i] = np.clip(img, 0, 255).astype(np.uint8)
    return x, y.astype(np.int64)


# -- numpy CNN -----------------------------------------------------------------------------------
def _im2col(x: np.ndarray, stride: int) -> np.ndarray:
    """x [N,C,H,W] → patches [N,Ho,Wo,C*9] (3x3, padding 1)."""
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    w = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride]
    n, c, ho, wo = w.shape[:4]
    return np.ascontiguousarray(w.transpose(0, 2, 3, 1, 4, 5)).reshape(n, ho, wo, c * 9)


def _col2im(d: np.ndarray, shape: tuple[int, ...], stride: int) -> np.ndarray:
    """Gradient of ``_im2col``: d [N,Ho,Wo,C*9] → [N,C,H,W]."""
    n, c, h, w = shape
    ho, wo = d.shape[1:3]
    d6 = d.reshape(n, ho, wo, c, 3, 3)
    out = np.zeros((n, c, h + 2, w + 2), d.dtype)
    for ki in range(3):
        for kj in range(3):
            out[:, :, ki:ki + stride * ho:stride, kj:kj + stride * wo:stride] += d6[..., ki, kj].transpose(0, 3, 1, 2)
    return out[:, :, 1:-1, 1:-1]


def init_params(rng: np.random.Generator, classes: int = len(SHAPES)) -> dict[str, np.ndarray]:
    p: dict[str, np.ndarray] = {}
    for i, (cin, cout, _) in enumerate(LAYERS):
        p[f"w{i}"] = (rng.standard_normal((cin * 9, cout)) * np.sqrt(2.0 / (cin * 9))).astype(np.float32)
        p[f"b{i}"] = np.zeros(cout, np.float32)
    p["wf"] = (rng.standard_normal((LAYERS[-1][1], classes)) * np.sqrt(1.0 / LAYERS[-1][1])).astype(np.float32)
    p["bf"] = np.zeros(classes, np.float32)
    return p


def to_nchw(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32).transpose(0, 3, 1, 2) / np.float32(255.0)


def forward(p: dict[str, np.ndarray], x: np.ndarray, keep: bool = False) -> tuple[np.ndarray, list[Any]]:
    """Logits for x [N,3,32,32] float; ``keep`` returns what backward needs (and every block)."""
    cache: list[Any] = []
    h = x
    for i, (_, cout, s) in enumerate(LAYERS):
        cols = _im2col(h, s)
        z = cols @ p[f"w{i}"] + p[f"b{i}"]
        a = np.maximum(z, 0)
        if keep:
            cache.append((h.shape, cols, z > 0))
        h = a.transpose(0, 3, 1, 2)
    f = h.mean(axis=(2, 3))
    if keep:
        cache.append((h.shape, f))
    return f @ p["wf"] + p["bf"], cache


def _backward(p: dict[str, np.ndarray], cache: list[Any], dlogits: np.ndarray) -> dict[str, np.ndarray]:
    g: dict[str, np.ndarray] = {}
    hshape, f = cache[-1]
    g["wf"], g["bf"] = f.T @ dlogits, dlogits.sum(0)
    df = dlogits @ p["wf"].T
    n, c, hh, ww = hshape
    dh = np.broadcast_to((df / (hh * ww))[:, :, None, None], hshape)
    for i in range(len(LAYERS) - 1, -1, -1):
        xshape, cols, pos = cache[i]
        dz = dh.transpose(0, 2, 3, 1) * pos
        dz2 = dz.reshape(-1, dz.shape[-1])
        g[f"w{i}"] = cols.reshape(-1, cols.shape[-1]).T @ dz2
        g[f"b{i}"] = dz2.sum(0)
        if i:
            dh = _col2im(dz @ p[f"w{i}"].T, xshape, LAYERS[i][2])
    return g


def train_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 8, seed: int = 0, batch: int = 64,
              lr: float = 1e-2) -> dict[str, np.ndarray]:
    """Adam on softmax cross-entropy; x uint8 images [n,32,32,3]."""
    rng = np.random.default_rng(seed)
    p = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(w) for k, w in p.items()}
    t = 0
    xs = to_nchw(x)
    for ep in range(epochs):
        step_lr = lr * (0.5 * (1 + np.cos(np.pi * ep / epochs)))
        for idx in np.array_split(rng.permutation(len(xs)), max(1, len(xs) // batch)):
            logits, cache = forward(p, xs[idx], keep=True)
            e = np.exp(logits - logits.max(1, keepdims=True))
            prob = e / e.sum(1, keepdims=True)
            prob[np.arange(len(idx)), y[idx]] -= 1
            g = _backward(p, cache, prob / len(idx))
            t += 1
            for k in p:
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v[k] = 0.999 * v[k] + 0.001 * g[k] * g[k]
                mh, vh = m[k] / (1 - 0.9 ** t), v[k] / (1 - 0.999 ** t)
                p[k] = (p[k] - step_lr * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
    return p


# -- ONNX ----------------------------------------------------------------------------------------
def export_backbone(p: dict[str, np.ndarray], path: str | Path) -> None:
    """image uint8 [N,32,32,3] → features [N,64]; the classifier stays outside (the bundle's head)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(np.array(1 / 255.0, np.float32), "inv255")]
    nodes = [helper.make_node("Cast", ["image"], ["image_f"], to=TensorProto.FLOAT),
             helper.make_node("Transpose", ["image_f"], ["image_t"], perm=[0, 3, 1, 2]),
             helper.make_node("Mul", ["image_t", "inv255"], ["x0"])]
    prev = "x0"
    for i, (cin, cout, s) in enumerate(LAYERS):
        w = p[f"w{i}"].reshape(cin, 3, 3, cout).transpose(3, 0, 1, 2)   # im2col order (c, ki, kj) → OIHW
        inits += [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), f"conv{i}.weight"),
                  numpy_helper.from_array(p[f"b{i}"].astype(np.float32), f"conv{i}.bias")]
        nodes += [helper.make_node("Conv", [prev, f"conv{i}.weight", f"conv{i}.bias"], [f"conv{i}"],
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[s, s]),
                  helper.make_node("Relu", [f"conv{i}"], [BLOCKS[i]])]
        prev = BLOCKS[i]
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["gap"]),
              helper.make_node("Flatten", ["gap"], ["features"], axis=1)]
    graph = helper.make_graph(nodes, "shapes_cnn", [helper.make_tensor_value_info("image", TensorProto.UINT8,
                                                                                  ["N", SIZE, SIZE, 3])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", LAYERS[-1][1]])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgefleet")
    model = onnx.shape_inference.infer_shapes(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@dataclass(frozen=True)
class CnnReport:
    path: str
    train_samples: int
    epochs: int
    accuracy: float
    train_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_data(path: str | Path, n: int = 8000, seed: int = 7) -> Path:
    """An unlabelled-use data file (x uint8 images, y labels) for training exit heads and
    bottlenecks (``--data``): other images than the model's training and eval sets."""
    x, y = make_shapes(n, seed)
    np.savez(path, x=x, y=y)
    return Path(path)


def shapes_split(seed: int = 0, n_train: int = 4000, n_test: int = 2000):
    xtr, ytr = make_shapes(n_train, seed)
    xte, yte = make_shapes(n_test, seed + 1000)
    return xtr, ytr, xte, yte


def build_cnn(out: str | Path, seed: int = 0, epochs: int = 8, n_train: int = 4000, version: str = "1.0.0",
              name: str = "shapes") -> CnnReport:
    """Train the CNN and write a bundle (fp32 backbone + head + reference + eval set)."""
    from protocol.bundle import head_bytes, load_bundle, softmax, write_manifest

    out = Path(out)
    t0 = time.time()
    xtr, ytr, xte, yte = shapes_split(seed, n_train)
    p = train_cnn(xtr, ytr, epochs, seed)
    secs = time.time() - t0
    acc = float((forward(p, to_nchw(xte))[0].argmax(1) == yte).mean())
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    export_backbone(p, tmp / "backbone.onnx")
    head = {"dense0.weight": p["wf"], "dense0.bias": p["bf"]}
    (tmp / "head.npz").write_bytes(head_bytes(head))
    ref_x = xte[:16]
    np.savez(tmp / "reference.npz", x=ref_x, probs=softmax(forward(p, to_nchw(ref_x))[0]).astype(np.float32))
    np.savez(tmp / "eval.npz", x=xte[:1000], y=yte[:1000])
    eval_acc = float((forward(p, to_nchw(xte[:1000]))[0].argmax(1) == yte[:1000]).mean())
    manifest = {
        "name": name, "version": version, "parent_version": None, "created": round(time.time(), 3),
        "input": {"name": "image", "shape": [None, SIZE, SIZE, 3], "dtype": "uint8", "min": 0, "max": 255},
        "features": {"name": "features", "shape": [None, LAYERS[-1][1]], "dtype": "float32"},
        "labels": list(SHAPES),
        "files": {"backbone.onnx": {"role": "backbone"}, "head.npz": {"role": "head"},
                  "reference.npz": {"role": "reference"}, "eval.npz": {"role": "eval"}},
        "metrics": {"fp32_accuracy": round(acc, 4), "train_seconds": round(secs, 1), "epochs": epochs,
                    "dataset": f"synthetic shapes (controller/modeltools/cnn.py), seed {seed}, {n_train} train"},
        "reference": {"file": "reference.npz", "min_agreement": 1.0, "max_prob_diff": 0.05},
        "eval": {"file": "eval.npz", "baseline_accuracy": round(eval_acc, 4), "max_accuracy_drop": 0.02},
    }
    write_manifest(tmp, manifest)
    load_bundle(tmp)
    replace_dir(tmp, out)
    return CnnReport(str(out), n_train, epochs, round(acc, 4), round(secs, 1))


if __name__ == "__main__":  # pragma: no cover
    import sys

    print(json.dumps(build_cnn(sys.argv[1]).to_dict(), indent=2))
