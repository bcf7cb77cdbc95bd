"""Early exits and the learned bottleneck at the split: the manifest fields and the maths both sides share.

A bundle may declare **exits** (additive manifest fields; a manifest without them is read as before)::

    "exits": [{"tensor": "block1", "head": "exit0.npz", "threshold": 0.93, "order": 0,
               "pool": 2, "compute": 0.13}, ...]
    "segments": ["segment0.onnx", "segment1.onnx", "segment2.onnx"]

The backbone is also shipped cut at the exit tensors: segment ``i`` maps the previous exit's
tensor (the model input for ``i = 0``) to ``exits[i].tensor``; the last maps the last exit's
tensor to the backbone's output. An exit head is a dense head (the ``head.npz`` format) over the
exit tensor average-pooled to ``pool`` × ``pool`` and flattened (``exit_features``); a
threshold of 1.0 means the exit never answers. ``compute`` is the fraction of the backbone's
multiply-accumulates done once that exit is reached, ``head_compute`` the exit head's own.

A **bottleneck** sits at one exit's tensor::

    "bottleneck": {"at": "block2", "encoder": "encoder.onnx", "decoder": "decoder.onnx",
                   "id": "<16 hex>", "channels": 4, "ratio": 0.125, "scale": 0.05,
                   "codec": "int8+zstd", "code_shape": [4, 8, 8]}

The board runs the encoder (int8 weights, int8 output: the code), the worker the decoder and
the segments after ``at``. ``id`` names the encoder/decoder pair: both ship in one bundle
version, and a worker whose decoder is another pair refuses the code (``decoder_mismatch``).
"""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
from typing import Any, Mapping

import numpy as np

CODECS = ("int8+zstd",)
MAX_EXITS = 8


@dataclass(frozen=True)
class ExitSpec:
    tensor: str
    head: str
    threshold: float
    order: int
    pool: int = 1
    compute: float | None = None
    # the exit head's own multiply-accumulates, as a fraction of the backbone's
    head_compute: float | None = None


@dataclass(frozen=True)
class BottleneckSpec:
    at: str
    encoder: str
    decoder: str
    id: str
    channels: int
    ratio: float
    scale: float
    codec: str = "int8+zstd"
    code_shape: tuple[int, ...] = ()


class ExitsError(ValueError):
    """Bad exit/bottleneck fields; ``protocol.bundle`` re-raises it as its BundleError (this module
    imports nothing of the bundle's: no import circle)."""


def _err(where: str, msg: str) -> ExitsError:
    return ExitsError(f"manifest {where}: {msg}")


def _file(name: Any, entries: Mapping[str, Any], role: str, where: str) -> str:
    if not isinstance(name, str) or name not in entries:
        raise _err(where, f"{name!r} is not a file of the bundle")
    if entries[name].role != role:
        raise _err(where, f"{name!r} has role {entries[name].role!r}, expected {role!r}")
    return name


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))


def parse_exits(d: Mapping[str, Any], entries: Mapping[str, Any], task: str
                ) -> tuple[tuple[ExitSpec, ...], tuple[str, ...], BottleneckSpec | None]:
    """The exits, segments and bottleneck of a manifest dict (pure); ExitsError naming the field."""
    raw = d.get("exits")
    exits: list[ExitSpec] = []
    if raw is not None:
        if not isinstance(raw, list) or not raw or len(raw) > MAX_EXITS:
            raise _err("exits", f"must be a non-empty list of at most {MAX_EXITS}")
        if task != "classify":
            raise _err("exits", f"early exits answer a classification; the task is {task!r}")
        for i, e in enumerate(raw):
            w = f"exits[{i}]"
            if not isinstance(e, dict):
                raise _err(w, "must be an object")
            t = e.get("tensor")
            if not isinstance(t, str) or not t:
                raise _err(f"{w}.tensor", "must be a tensor name")
            thr = e.get("threshold")
            if not _num(thr) or not 0 < thr <= 1:
                raise _err(f"{w}.threshold", f"must be in (0, 1], got {thr!r}")
            order = e.get("order", i)
            if isinstance(order, bool) or not isinstance(order, int):
                raise _err(f"{w}.order", "must be an integer")
            pool = e.get("pool", 1)
            if isinstance(pool, bool) or not isinstance(pool, int) or not 1 <= pool <= 16:
                raise _err(f"{w}.pool", "must be an integer in [1, 16]")
            comp, hc = e.get("compute"), e.get("head_compute")
            for key, v in (("compute", comp), ("head_compute", hc)):
                if v is not None and (not _num(v) or not 0 <= v <= 1):
                    raise _err(f"{w}.{key}", "must be a fraction in [0, 1]")
            exits.append(ExitSpec(t, _file(e.get("head"), entries, "exit_head", f"{w}.head"), float(thr), order,
                                  pool, None if comp is None else float(comp), None if hc is None else float(hc)))
        orders = [e.order for e in exits]
        if orders != sorted(orders) or len(set(orders)) != len(orders):
            raise _err("exits", f"must be listed in strictly increasing order, got orders {orders}")
        tensors = [e.tensor for e in exits]
        if len(set(tensors)) != len(tensors):
            raise _err("exits", f"exit tensors must be distinct, got {tensors}")
    segs_raw = d.get("segments")
    segments: tuple[str, ...] = ()
    if exits or segs_raw is not None:
        if not isinstance(segs_raw, list) or len(segs_raw) != len(exits) + 1:
            raise _err("segments", f"must list {len(exits) + 1} segment files (one more than the exits)")
        segments = tuple(_file(s, entries, "segment", f"segments[{i}]") for i, s in enumerate(segs_raw))
        if any(not s.endswith(".onnx") for s in segments):
            raise _err("segments", "segments are ONNX graphs (exits are not supported on LiteRT bundles)")
    bn = None
    b = d.get("bottleneck")
    if b is not None:
        if not isinstance(b, dict):
            raise _err("bottleneck", "must be an object")
        at = b.get("at")
        if at not in [e.tensor for e in exits]:
            raise _err("bottleneck.at", f"{at!r} must be one of the exit tensors {[e.tensor for e in exits]}")
        bid = b.get("id")
        if not isinstance(bid, str) or not 8 <= len(bid) <= 64:
            raise _err("bottleneck.id", "must be a hex id of 8 to 64 chars")
        ch = b.get("channels")
        if isinstance(ch, bool) or not isinstance(ch, int) or ch < 1:
            raise _err("bottleneck.channels", "must be a positive integer")
        for k in ("ratio", "scale"):
            if not _num(b.get(k)) or not b[k] > 0:
                raise _err(f"bottleneck.{k}", "must be a number > 0")
        codec = b.get("codec", "int8+zstd")
        if codec not in CODECS:
            raise _err("bottleneck.codec", f"{codec!r} not one of {CODECS}")
        shape = b.get("code_shape", [])
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                  for s in shape):
            raise _err("bottleneck.code_shape", "must be a list of positive integers")
        bn = BottleneckSpec(at, _file(b.get("encoder"), entries, "encoder", "bottleneck.encoder"),
                            _file(b.get("decoder"), entries, "decoder", "bottleneck.decoder"), bid, ch,
                            float(b["ratio"]), float(b["scale"]), codec, tuple(shape))
    return tuple(exits), segments, bn


def exit_features(t: np.ndarray, pool: int) -> np.ndarray:
    """An exit tensor [N,C,H,W] average-pooled to pool × pool, flattened → [N, C·pool²];
    a rank-2 tensor is taken as it is. H and W must be multiples of ``pool``."""
    if t.ndim == 2:
        return t.astype(np.float32, copy=False)
    n, c, h, w = t.shape
    p = pool
    return t.reshape(n, c, p, h // p, p, w // p).mean(axis=(3, 5), dtype=np.float32).reshape(n, c * p * p)


def pair_id(encoder_sha256: str, decoder_sha256: str, backbone_sha256: str, at: str) -> str:
    """The bottleneck's id: the encoder, the decoder, the backbone they were trained on and the cut."""
    h = hashlib.sha256("\0".join((encoder_sha256, decoder_sha256, backbone_sha256, at)).encode())
    return h.hexdigest()[:16]


def split_tag(backbone_sha256: str, at: str) -> str:
    """What a feature request names as its split: the backbone and the cut tensor (16 hex)."""
    return hashlib.sha256(f"{backbone_sha256}\0{at}".encode()).hexdigest()[:16]
