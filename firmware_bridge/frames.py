"""Link frames and typed messages between the agent and a sensor MCU (protocol version 1).

On the wire every frame is ``COBS(body) 0x00`` where ``body`` is (little-endian)::

    0  1  version (1)
    1  1  message type (``MsgType``)
    2  2  sequence number (uint16, wraps; per direction)
    4  n  payload (typed, below)
    4+n 4 CRC-32 (IEEE 802.3, zlib.crc32) of bytes 0 .. 4+n-1

CRC-32 rather than CRC-16: frames reach 1 KiB+ during model pushes, where CRC-16's
Hamming distance drops; every MCU family we target has a CRC-32 peripheral or a 1 KiB table.
Payloads are fixed little-endian structs plus length-prefixed UTF-8/bytes, easy in C.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
import struct
import zlib
from typing import Any

VERSION = 1
MAX_FRAME_DEFAULT = 1024
_HDR = struct.Struct("<BBH")


class MsgType(IntEnum):
    HELLO = 0x01          # MCU → agent: device id, firmware, sensors, sample format, max frame
    HELLO_ACK = 0x02      # agent → MCU: agreed max frame size
    SENSOR_FRAME = 0x10   # MCU → agent: timestamp + float32 samples
    RESULT = 0x11         # MCU → agent: an on-MCU inference result
    INFER_REPLY = 0x12    # agent → MCU: the agent's answer for a sensor frame
    LOG = 0x20            # MCU → agent: level + text
    HEARTBEAT = 0x21      # both ways: uptime
    MODEL_BEGIN = 0x30    # agent → MCU: transfer id, total size, chunk size, CRC-32 of the blob
    MODEL_CHUNK = 0x31    # agent → MCU: transfer id, index, CRC-32 of the chunk, data
    MODEL_END = 0x32      # agent → MCU: transfer id, chunk count
    ACK = 0x40            # MCU → agent: transfer id, index (0xFFFF = whole transfer)
    NACK = 0x41           # MCU → agent: transfer id, index, reason code


class FrameError(ValueError):
    """A frame from the peer we drop (counted); ``reason`` is a short slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class Message:
    type: MsgType
    seq: int
    fields: dict[str, Any] = field(default_factory=dict)


def _str(b: bytes, off: int) -> tuple[str, int]:
    if off + 1 > len(b):
        raise FrameError("truncated", "string length missing")
    n = b[off]
    if off + 1 + n > len(b):
        raise FrameError("truncated", "string shorter than its length")
    try:
        return b[off + 1:off + 1 + n].decode("utf-8"), off + 1 + n
    except UnicodeDecodeError:
        raise FrameError("bad_payload", "string is not UTF-8") from None


def _pstr(s: str) -> bytes:
    b = s.encode("utf-8")[:255]
    return bytes([len(b)]) + b


def encode_payload(t: MsgType, f: dict[str, Any]) -> bytes:
    if t == MsgType.HELLO:
        sensors = f.get("sensors", [])
        return (_pstr(f["device_id"]) + _pstr(f["firmware"]) + struct.pack("<HHB", f["max_frame"],
                f["samples_per_frame"], len(sensors)) + b"".join(_pstr(s) for s in sensors))
    if t == MsgType.HELLO_ACK:
        return struct.pack("<H", f["max_frame"])
    if t == MsgType.SENSOR_FRAME:
        samples = f["samples"]
        return struct.pack(f"<IH{len(samples)}f", f["timestamp_ms"], len(samples), *samples)
    if t == MsgType.RESULT:
        return struct.pack("<IHf", f["timestamp_ms"], f["label"], f["confidence"])
    if t == MsgType.INFER_REPLY:
        return struct.pack("<HHf", f["ref_seq"], f["label"], f["confidence"])
    if t == MsgType.LOG:
        return bytes([f["level"]]) + _pstr(f["text"])
    if t == MsgType.HEARTBEAT:
        return struct.pack("<I", f["uptime_s"])
    if t == MsgType.MODEL_BEGIN:
        return struct.pack("<HIHI", f["transfer_id"], f["total_size"], f["chunk_size"], f["crc32"])
    if t == MsgType.MODEL_CHUNK:
        return struct.pack("<HHI", f["transfer_id"], f["index"], zlib.crc32(f["data"])) + f["data"]
    if t == MsgType.MODEL_END:
        return struct.pack("<HH", f["transfer_id"], f["chunks"])
    if t == MsgType.ACK:
        return struct.pack("<HH", f["transfer_id"], f["index"])
    if t == MsgType.NACK:
        return struct.pack("<HHB", f["transfer_id"], f["index"], f["reason"])
    raise ValueError(f"unknown message type {t!r}")  # our bug


def _unpack(fmt: str, b: bytes, off: int = 0) -> tuple:
    s = struct.Struct(fmt)
    if off + s.size > len(b):
        raise FrameError("truncated", f"payload of {len(b)} bytes too short for {fmt}")
    return s.unpack_from(b, off)


def decode_payload(t: MsgType, b: bytes) -> dict[str, Any]:
    if t == MsgType.HELLO:
        dev, off = _str(b, 0)
        fw, off = _str(b, off)
        max_frame, spf, n = _unpack("<HHB", b, off)
        off += 5
        sensors = []
        for _ in range(n):
            s, off = _str(b, off)
            sensors.append(s)
        if off != len(b):
            raise FrameError("bad_payload", "trailing bytes after HELLO")
        if not dev:
            raise FrameError("bad_payload", "empty device id")
        if max_frame < 64:
            raise FrameError("bad_payload", f"max_frame {max_frame} below the minimum of 64")
        return {"device_id": dev, "firmware": fw, "max_frame": max_frame, "samples_per_frame": spf, "sensors": sensors}
    if t == MsgType.HELLO_ACK:
        return {"max_frame": _unpack("<H", b)[0]}
    if t == MsgType.SENSOR_FRAME:
        ts, n = _unpack("<IH", b)
        if len(b) != 6 + 4 * n:
            raise FrameError("bad_payload", f"sensor frame says {n} samples, carries {(len(b) - 6) / 4:g}")
        return {"timestamp_ms": ts, "samples": list(struct.unpack_from(f"<{n}f", b, 6))}
    if t == MsgType.RESULT:
        ts, label, conf = _unpack("<IHf", b)
        return {"timestamp_ms": ts, "label": label, "confidence": conf}
    if t == MsgType.INFER_REPLY:
        ref, label, conf = _unpack("<HHf", b)
        return {"ref_seq": ref, "label": label, "confidence": conf}
    if t == MsgType.LOG:
        if not b:
            raise FrameError("truncated", "empty LOG")
        text, off = _str(b, 1)
        return {"level": b[0], "text": text}
    if t == MsgType.HEARTBEAT:
        return {"uptime_s": _unpack("<I", b)[0]}
    if t == MsgType.MODEL_BEGIN:
        tid, total, chunk, crc = _unpack("<HIHI", b)
        return {"transfer_id": tid, "total_size": total, "chunk_size": chunk, "crc32": crc}
    if t == MsgType.MODEL_CHUNK:
        tid, idx, crc = _unpack("<HHI", b)
        data = b[8:]
        if zlib.crc32(data) != crc:
            raise FrameError("chunk_crc", f"chunk {idx} CRC mismatch")
        return {"transfer_id": tid, "index": idx, "data": data}
    if t == MsgType.MODEL_END:
        tid, n = _unpack("<HH", b)
        return {"transfer_id": tid, "chunks": n}
    if t == MsgType.ACK:
        tid, idx = _unpack("<HH", b)
        return {"transfer_id": tid, "index": idx}
    if t == MsgType.NACK:
        tid, idx, reason = _unpack("<HHB", b)
        return {"transfer_id": tid, "index": idx, "reason": reason}
    raise FrameError("unknown_type", f"message type {t}")


def encode_body(msg: Message) -> bytes:
    body = _HDR.pack(VERSION, int(msg.type), msg.seq & 0xFFFF) + encode_payload(msg.type, msg.fields)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_body(body: bytes) -> Message:
    if len(body) < _HDR.size + 4:
        raise FrameError("truncated", f"frame of {len(body)} bytes")
    crc = struct.unpack_from("<I", body, len(body) - 4)[0]
    if zlib.crc32(body[:-4]) != crc:
        raise FrameError("crc", "CRC-32 mismatch")
    version, t, seq = _HDR.unpack_from(body, 0)
    if version != VERSION:
        raise FrameError("version", f"protocol version {version}, we speak {VERSION}")
    try:
        mt = MsgType(t)
    except ValueError:
        raise FrameError("unknown_type", f"message type {t:#x}") from None
    return Message(mt, seq, decode_payload(mt, body[_HDR.size:-4]))
