"""Update compression on the device, reversed on the controller.

Pipeline (each stage optional): top-k sparsification with error feedback (what is not sent
this round is added to the next update, so nothing is lost over time) → int8 quantization
(per-tensor scale) → zstd. The input is the delta (local − global).

Wire format (little-endian)::

    0  4  magic b"EFU1"
    4  1  flags: 1 = top-k, 2 = int8, 4 = zstd
    5  4  header length H
    9  H  JSON: [{"name", "shape", "k", "scale"}]   (k = values kept; scale for int8)
    9+H   body (zstd-compressed when flag 4): per tensor, [uint32 indices × k if top-k]
          then values (int8 or float32 × k)

``decode_update`` checks every count, index and size against the expected shapes before
building anything and raises ``CompressionError`` on truncated, padded or corrupt input.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
import struct
from typing import Mapping

import numpy as np

MAGIC = b"EFU1"
_P = struct.Struct("<4sBI")
F_TOPK, F_INT8, F_ZSTD = 1, 2, 4
MAX_RAW = 256 * 1024 * 1024


class CompressionError(ValueError):
    pass


@dataclass
class Compressor:
    """Device side; keeps the error-feedback residual between rounds (one per run)."""

    topk: float | None = None      # fraction of values kept, e.g. 0.1
    int8: bool = False
    zstd: bool = True
    error_feedback: bool = True
    level: int = 3

    def __post_init__(self) -> None:
        if self.topk is not None and not (0 < float(self.topk) <= 1):
            raise ValueError("topk must be in (0, 1]")
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        flags = (F_TOPK if self.topk else 0) | (F_INT8 if self.int8 else 0) | (F_ZSTD if self.zstd else 0)
        header, parts = [], []
        for name in sorted(delta):
            v = np.asarray(delta[name], np.float32).reshape(-1)
            if self.error_feedback and name in self.residual:
                v = v + self.residual[name]
            sent = np.zeros_like(v)
            if self.topk:
                k = max(1, int(np.ceil(self.topk * v.size)))
                idx = np.sort(np.argpartition(np.abs(v), v.size - k)[v.size - k:]).astype(np.uint32)
                vals = v[idx]
            else:
                k, idx, vals = v.size, None, v
            scale = 0.0
            if self.int8:
                m = float(np.abs(vals).max()) if vals.size else 0.0
                scale = m / 127.0 if m > 0 else 1.0
                q = np.clip(np.round(vals / scale), -127, 127).astype(np.int8)
                deq = q.astype(np.float32) * scale
                payload = q.tobytes()
            else:
                deq = vals.astype(np.float32)
                payload = deq.tobytes()
            if idx is not None:
                parts.append(idx.astype("<u4").tobytes())
                sent[idx] = deq
            else:
                sent = deq
            parts.append(payload)
            if self.error_feedback:
                self.residual[name] = v - sent
            header.append({"name": name, "shape": list(np.shape(delta[name])), "k": int(k), "scale": scale})
        body = b"".join(parts)
        if self.zstd:
            import zstandard

            body = zstandard.ZstdCompressor(level=self.level).compress(body)
        hb = json.dumps(header, separators=(",", ":")).encode()
        return _P.pack(MAGIC, flags, len(hb)) + hb + body


def decode_update(blob: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    if len(blob) < _P.size:
        raise CompressionError("truncated update")
    magic, flags, hlen = _P.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CompressionError(f"bad magic {magic!r}")
    if flags & ~(F_TOPK | F_INT8 | F_ZSTD):
        raise CompressionError(f"unknown flags {flags:#x}")
    if _P.size + hlen > len(blob) or hlen > 1 << 20:
        raise CompressionError("header exceeds the update")
    try:
        header = json.loads(blob[_P.size:_P.size + hlen])
    except ValueError as exc:
        raise CompressionError(f"header is not JSON: {exc}") from None
    if not isinstance(header, list) or not all(isinstance(h, dict) and isinstance(h.get("name"), str) for h in header) \
            or {h["name"] for h in header} != set(shapes) or len(header) != len(shapes):
        raise CompressionError(f"tensors do not match the global head ({sorted(shapes)})")
    need = 0
    for h in header:
        shape = tuple(shapes[h["name"]])
        size = int(np.prod(shape))
        if list(shape) != h.get("shape"):
            raise CompressionError(f"{h['name']}: shape {h.get('shape')} != {list(shape)}")
        k = h.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not (0 <= k <= size) or (not flags & F_TOPK and k != size):
            raise CompressionError(f"{h['name']}: bad value count {k!r}")
        sc = h.get("scale", 0.0)
        h["scale"] = sc
        if not isinstance(sc, (int, float)) or not np.isfinite(sc) or sc < 0:
            raise CompressionError(f"{h['name']}: bad scale {sc!r}")
        need += (4 * k if flags & F_TOPK else 0) + (k if flags & F_INT8 else 4 * k)
    body = blob[_P.size + hlen:]
    if flags & F_ZSTD:
        import zstandard

        if need > MAX_RAW:
            raise CompressionError("update too large")
        try:
            declared = zstandard.frame_content_size(body)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd: {exc}") from None
        if declared != need:  # zstd enforces the declared size, so this bounds the output
            raise CompressionError(f"zstd frame declares {declared} bytes, header needs {need}")
        try:
            d = zstandard.ZstdDecompressor().decompressobj()
            out_b = d.decompress(body)
        except zstandard.ZstdError as exc:
            raise CompressionError(f"zstd: {exc}") from None
        if not d.eof:
            raise CompressionError("zstd frame is truncated")
        if d.unused_data:
            raise CompressionError("trailing bytes after the zstd frame")
        body = out_b
    if len(body) != need:
        raise CompressionError(f"body has {len(body)} bytes, header needs {need}")
    out: dict[str, np.ndarray] = {}
    off = 0
    for h in header:
        shape = tuple(shapes[h["name"]])
        size, k = int(np.prod(shape)), h["k"]
        idx = None
        if flags & F_TOPK:
            idx = np.frombuffer(body, "<u4", k, off).astype(np.int64)
            off += 4 * k
            if k and (idx.max() >= size or np.any(np.diff(idx) <= 0)):
                raise CompressionError(f"{h['name']}: indices out of range or not strictly increasing")
        if flags & F_INT8:
            vals = np.frombuffer(body, np.int8, k, off).astype(np.float32) * np.float32(h["scale"])
            off += k
        else:
            vals = np.frombuffer(body, "<f4", k, off).astype(np.float32)
            off += 4 * k
        if not np.all(np.isfinite(vals)):
            raise CompressionError(f"{h['name']}: NaN or inf values")
        full = np.zeros(size, np.float32)
        if idx is None:
            full[:] = vals
        else:
            full[idx] = vals
        out[h["name"]] = full.reshape(shape)
    return out
