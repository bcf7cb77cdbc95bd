"""Binary frames for tensors and chunks (never pickle).

Layout, all integers little-endian::

    0   2   magic  b"EF"
    2   1   format version (1)
    3   1   flags: bit 0 (``FLAG_ZSTD``) = the payload is one zstd frame; other bits reserved (0)
    4   4   header length H (uint32)
    8   H   header: UTF-8 JSON = the envelope (schema, kind, id, sender, ts, body)
            plus "tensors": [{"name", "dtype", "shape", "offset", "nbytes"}, ...]
            and "blob": {"offset", "nbytes"} when a raw blob is carried,
            and "payload_sha256": hex SHA-256 of the payload (checked on decode)
    8+H ... payload; tensor/blob offsets are relative to its start (of the decompressed
            payload when FLAG_ZSTD is set; ``payload_sha256`` is always over the decompressed
            bytes, so a signature does not depend on the compression, and decompression stops
            at the frame size limit: a small frame cannot inflate past it)

A signed frame (``protocol.cmdauth.sign_frame``) also puts ``payload_sha256`` into the
envelope body before signing, so the signature covers the tensors too.

dtype is a numpy name from ``DTYPES`` (little-endian). Every offset/size is checked
against the payload before any array is built, so a hostile frame cannot make us
read out of bounds or allocate more than it sent.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import json
import struct
from typing import Any, Mapping

import numpy as np

from .envelope import DecodeError, Envelope, from_dict, BodyCheck

MAGIC = b"EF"
FLAG_ZSTD = 0x01
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<2sBBI")
MAX_FRAME_BYTES = 8 * 1024 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 256
MAX_DIMS = 8
DTYPES = ("float16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool")


@dataclass(frozen=True)
class Frame:
    envelope: Envelope
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    blob: bytes = b""
    payload_sha256: str = ""


def payload_of(tensors: Mapping[str, np.ndarray] | None, blob: bytes = b"") -> tuple[list[dict[str, Any]], bytes]:
    """Tensor specs and the payload bytes, exactly as ``encode_frame`` lays them out."""
    parts: list[bytes] = []
    offset = 0
    specs: list[dict[str, Any]] = []
    for name, arr in (tensors or {}).items():
        a = np.asarray(arr)
        if a.dtype.name not in DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} not allowed on the wire")
        data = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()
        specs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape), "offset": offset,
                      "nbytes": len(data)})
        parts.append(data)
        offset += len(data)
    if blob:
        parts.append(bytes(blob))
    return specs, b"".join(parts)


def encode_frame(env: Envelope, tensors: Mapping[str, np.ndarray] | None = None, blob: bytes = b"",
                 compress: bool | int = False) -> bytes:
    """``compress``: zstd the payload (True = level 3, or a level); kept uncompressed when that
    does not make it smaller (random or already-compressed data)."""
    header: dict[str, Any] = env.to_dict()
    specs, payload = payload_of(tensors, blob)
    if specs:
        header["tensors"] = specs
    if blob:
        header["blob"] = {"offset": len(payload) - len(blob), "nbytes": len(blob)}
    header["payload_sha256"] = hashlib.sha256(payload).hexdigest()
    hb = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    flags = 0
    if compress and payload:
        import zstandard

        packed = zstandard.ZstdCompressor(level=3 if compress is True else int(compress)).compress(payload)
        if len(packed) < len(payload):
            payload, flags = packed, FLAG_ZSTD
    return _PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(hb)) + hb + payload


def is_frame(payload: bytes | memoryview) -> bool:
    return len(payload) >= 2 and bytes(payload[:2]) == MAGIC


def decode_frame(payload: bytes | bytearray | memoryview, *, max_bytes: int = MAX_FRAME_BYTES,
                 expect_sender: str | None = None, kinds: Mapping[str, BodyCheck] | None = None) -> Frame:
    """Validate and decode a binary frame; raises DecodeError only."""
    mv = memoryview(payload)
    if len(mv) > max_bytes:
        raise DecodeError("oversize", f"{len(mv)} bytes > limit {max_bytes}")
    if len(mv) < _PREFIX.size:
        raise DecodeError("truncated", f"{len(mv)} bytes is shorter than the {_PREFIX.size}-byte prefix")
    magic, version, flags, hlen = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise DecodeError("bad_frame", f"bad magic {magic!r}", "magic")
    if version != FORMAT_VERSION:
        raise DecodeError("schema", f"unsupported frame format {version}", "version")
    if flags & ~FLAG_ZSTD:
        raise DecodeError("bad_frame", f"unknown flags {flags:#x}", "flags")
    if hlen > MAX_HEADER_BYTES or _PREFIX.size + hlen > len(mv):
        raise DecodeError("truncated", f"header length {hlen} exceeds the frame", "header")
    try:
        header = json.loads(bytes(mv[_PREFIX.size:_PREFIX.size + hlen]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("bad_json", f"header is not valid JSON: {exc}", "header") from None
    if not isinstance(header, dict):
        raise DecodeError("bad_json", "header must be an object", "header")
    env = from_dict(header, expect_sender=expect_sender, kinds=kinds)
    data = mv[_PREFIX.size + hlen:]
    if flags & FLAG_ZSTD:
        data = memoryview(_inflate(data, max_bytes))
    digest = hashlib.sha256(data).hexdigest()
    if header.get("payload_sha256") != digest:
        raise DecodeError("bad_frame", "payload SHA-256 does not match the header (corrupt or truncated)",
                          "payload_sha256")
    tensors: dict[str, np.ndarray] = {}
    specs = header.get("tensors", [])
    if not isinstance(specs, list) or len(specs) > MAX_TENSORS:
        raise DecodeError("field", f"must be a list of at most {MAX_TENSORS}", "tensors")
    for i, spec in enumerate(specs):
        tensors_name, arr = _tensor(spec, data, i)
        if tensors_name in tensors:
            raise DecodeError("field", f"duplicate tensor {tensors_name!r}", f"tensors[{i}].name")
        tensors[tensors_name] = arr
    blob = b""
    bspec = header.get("blob")
    if bspec is not None:
        off, n = _span(bspec, len(data), "blob")
        blob = bytes(data[off:off + n])
    return Frame(env, tensors, blob, digest)


def _inflate(data: memoryview, max_bytes: int) -> bytes:
    """Decompress at most ``max_bytes`` (never trusting the frame's own content-size claim)."""
    import zstandard

    try:
        parts, n = [], 0
        with zstandard.ZstdDecompressor().stream_reader(bytes(data)) as r:
            while n <= max_bytes:
                chunk = r.read(min(1 << 20, max_bytes + 1 - n))
                if not chunk:
                    break
                parts.append(chunk)
                n += len(chunk)
        out = b"".join(parts)
    except zstandard.ZstdError as exc:
        raise DecodeError("bad_frame", f"payload is not valid zstd: {exc}", "payload") from None
    if len(out) > max_bytes:
        raise DecodeError("oversize", f"payload inflates past the limit of {max_bytes} bytes")
    return out


def _span(spec: Any, limit: int, where: str) -> tuple[int, int]:
    if not isinstance(spec, dict):
        raise DecodeError("field", "must be an object", where)
    off, n = spec.get("offset"), spec.get("nbytes")
    for name, v in (("offset", off), ("nbytes", n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise DecodeError("field", "must be a non-negative integer", f"{where}.{name}")
    if off + n > limit:
        raise DecodeError("truncated", f"bytes {off}..{off + n} exceed the payload of {limit}", where)
    return off, n


def _tensor(spec: Any, data: memoryview, i: int) -> tuple[str, np.ndarray]:
    where = f"tensors[{i}]"
    off, n = _span(spec, len(data), where)
    name = spec.get("name")
    if not isinstance(name, str) or not name or len(name) > 128:
        raise DecodeError("field", "must be a non-empty string", f"{where}.name")
    dtype = spec.get("dtype")
    if dtype not in DTYPES:
        raise DecodeError("field", f"dtype {dtype!r} not one of {', '.join(DTYPES)}", f"{where}.dtype")
    shape = spec.get("shape")
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)):
        raise DecodeError("field", f"must be a list of at most {MAX_DIMS} non-negative ints", f"{where}.shape")
    dt = np.dtype(dtype).newbyteorder("<")
    count = 1
    for d in shape:
        count *= d
    if count * dt.itemsize != n:
        raise DecodeError("field", f"shape {shape} x {dtype} needs {count * dt.itemsize} bytes, frame says {n}",
                          f"{where}.nbytes")
    arr = np.frombuffer(data[off:off + n], dtype=dt).reshape(shape).astype(dt.newbyteorder("="), copy=True)
    return name, arr
