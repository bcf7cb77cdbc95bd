"""Update compression on the device, reversed on the controller.

Pipeline (each stage optional): top-k sparsification with error feedback (what is not sent
this round is added to the next update, so nothing is lost over time) → int8 quantization
(per-tensor scale) → zstd (kept only when it makes the body smaller). The input is the
delta (local − global). Both sides know the global head's tensor names and shapes, so the
wire carries only a checksum of them, not the names.

Wire format (little-endian)::

    0   4  magic b"EFU2"
    4   1  flags: 1 = top-k, 2 = int8, 4 = zstd
    5   2  tensor count T
    7   4  CRC-32 of "name:shape;" over the tensors in sorted name order
    11  8T per tensor (sorted by name): uint32 k (values kept), float32 int8 scale
    ..     body (zstd frame when flag 4): per tensor, indices (uint16 when the tensor has
           <= 65536 values, else uint32) × k if top-k, then values (int8 or float32) × k

``decode_update`` checks the checksum, every count, index and size against the expected
shapes before building anything and raises ``CompressionError`` on truncated, padded or
corrupt input.
"""
from __future__ import annotations

from dataclasses import dataclass
import struct
import zlib
from typing import Mapping

import numpy as np

MAGIC = b"EFU2"
_P = struct.Struct("<4sBHI")
_T = struct.Struct("<If")
F_TOPK, F_INT8, F_ZSTD = 1, 2, 4
MAX_RAW = 256 * 1024 * 1024


class CompressionError(ValueError):
    pass


def layout_crc(shapes: Mapping[str, tuple[int, ...]]) -> int:
    s = ";".join(f"{k}:{'x'.join(map(str, shapes[k]))}" for k in sorted(shapes))
    return zlib.crc32(s.encode())


def _idx_dtype(size: int) -> str:
    return "<u2" if size <= 65536 else "<u4"


@dataclass
class Compressor:
    """Device side; keeps the error-feedback residual between rounds (one per run)."""

    topk: float | None = None      # fraction of values kept, e.g. 0.05
    int8: bool = False
    zstd: bool = True
    error_feedback: bool = True
    level: int = 3

    def __post_init__(self) -> None:
        if self.topk is not None and not (0 < float(self.topk) <= 1):
            raise ValueError("topk must be in (0, 1]")
        self.residual: dict[str, np.ndarray] = {}

    def encode(self, delta: Mapping[str, np.ndarray]) -> bytes:
        flags = (F_TOPK if self.topk else 0) | (F_INT8 if self.int8 else 0)
        heads, parts = [], []
        for name in sorted(delta):
            v = np.asarray(delta[name], np.float32).reshape(-1)
            if self.error_feedback and name in self.residual:
                v = v + self.residual[name]
            if self.topk:
                k = max(1, int(np.ceil(self.topk * v.size)))
                idx = np.sort(np.argpartition(np.abs(v), v.size - k)[v.size - k:])
                vals = v[idx]
            else:
                k, idx, vals = v.size, None, v
            scale = 0.0
            if self.int8:
                m = float(np.abs(vals).max()) if vals.size else 0.0
                scale = m / 127.0 if m > 0 else 1.0
                q = np.clip(np.round(vals / scale), -127, 127).astype(np.int8)
                deq, payload = q.astype(np.float32) * np.float32(scale), q.tobytes()
            else:
                deq = vals.astype(np.float32)
                payload = deq.astype("<f4").tobytes()
            if idx is not None:
                parts.append(idx.astype(_idx_dtype(v.size)).tobytes())
                sent = np.zeros_like(v)
                sent[idx] = deq
            else:
                sent = deq
            parts.append(payload)
            if self.error_feedback:
                self.residual[name] = v - sent
            heads.append(_T.pack(k, scale))
        body = b"".join(parts)
        if self.zstd:
            import zstandard

            z = zstandard.ZstdCompressor(level=self.level).compress(body)
            if len(z) < len(body):
                body, flags = z, flags | F_ZSTD
        shapes = {k: tuple(np.shape(v)) for k, v in delta.items()}
        return _P.pack(MAGIC, flags, len(heads), layout_crc(shapes)) + b"".join(heads) + body


def decode_update(blob: bytes, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    if len(blob) < _P.size:
        raise CompressionError("truncated update")
    magic, flags, count, crc = _P.unpack_from(blob, 0)
    if magic != MAGIC:
        raise CompressionError(f"bad magic {magic!r}")
    if flags & ~(F_TOPK | F_INT8 | F_ZSTD):
        raise CompressionError(f"unknown flags {flags:#x}")
    names = sorted(shapes)
    if count != len(names) or crc != layout_crc(shapes):
        raise CompressionError(f"tensors do not match the global head ({names})")
    hend = _P.size + _T.size * count
    if hend > len(blob):
        raise CompressionError("truncated update header")
    metas, need = [], 0
    for i, name in enumerate(names):
        k, scale = _T.unpack_from(blob, _P.size + _T.size * i)
        size = int(np.prod(shapes[name]))
        if k > size or (not flags & F_TOPK and k != size):
            raise CompressionError(f"{name}: bad value count {k}")
        if not np.isfinite(scale) or scale < 0:
            raise CompressionError(f"{name}: bad scale {scale}")
        isz = np.dtype(_idx_dtype(size)).itemsize
        need += (isz * k if flags & F_TOPK else 0) + (k if flags & F_INT8 else 4 * k)
        metas.append((name, size, k, scale, isz))
    body = blob[hend:]
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
    for name, size, k, scale, isz in metas:
        idx = None
        if flags & F_TOPK:
            idx = np.frombuffer(body, _idx_dtype(size), k, off).astype(np.int64)
            off += isz * k
            if k and (idx.max() >= size or np.any(np.diff(idx) <= 0)):
                raise CompressionError(f"{name}: indices out of range or not strictly increasing")
        if flags & F_INT8:
            vals = np.frombuffer(body, np.int8, k, off).astype(np.float32) * np.float32(scale)
            off += k
        else:
            vals = np.frombuffer(body, "<f4", k, off).astype(np.float32)
            off += 4 * k
        if not np.all(np.isfinite(vals)):
            raise CompressionError(f"{name}: NaN or inf values")
        full = np.zeros(size, np.float32)
        if idx is None:
            full[:] = vals
        else:
            full[idx] = vals
        out[name] = full.reshape(shapes[name])
    return out
