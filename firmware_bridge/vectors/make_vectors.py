"""Regenerate v1.json: golden test vectors (wire bytes → decoded message) for firmware authors,
and push_v1.json: model-push conversations (the agent's frames in → the answers an MCU must give,
from the reference receiver ``firmware_bridge.push.ModelReceiver``).

    python -m firmware_bridge.vectors.make_vectors
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from firmware_bridge import cobs
from firmware_bridge.frames import Message, MsgType, encode_body
from firmware_bridge.link import Link
from firmware_bridge.push import WHOLE, ModelReceiver

HERE = Path(__file__).resolve().parent

VALID = [
    (MsgType.HELLO, {"device_id": "mcu-1", "firmware": "1.2.3", "max_frame": 512, "samples_per_frame": 64,
                     "sensors": ["accel", "temp"]}),
    (MsgType.HELLO_ACK, {"max_frame": 512}),
    (MsgType.SENSOR_FRAME, {"timestamp_ms": 1234, "samples": [0.0, 1.5, 16.0, -2.25]}),
    (MsgType.RESULT, {"timestamp_ms": 99, "label": 7, "confidence": 0.5}),
    (MsgType.INFER_REPLY, {"ref_seq": 3, "label": 2, "confidence": 0.25}),
    (MsgType.LOG, {"level": 2, "text": "boot ok"}),
    (MsgType.HEARTBEAT, {"uptime_s": 3600}),
    (MsgType.MODEL_BEGIN, {"transfer_id": 5, "total_size": 1000, "chunk_size": 256, "crc32": 3735928559}),
    (MsgType.MODEL_CHUNK, {"transfer_id": 5, "index": 0, "data": bytes([0, 1, 2, 0, 255])}),
    (MsgType.MODEL_END, {"transfer_id": 5, "chunks": 4}),
    (MsgType.ACK, {"transfer_id": 5, "index": 65535}),
    (MsgType.NACK, {"transfer_id": 5, "index": 2, "reason": 1}),
]


def wire(body: bytes) -> str:
    return (cobs.encode(body) + b"\x00").hex()


def main() -> None:
    frames = []
    for seq, (t, f) in enumerate(VALID):
        body = encode_body(Message(t, seq, f))
        frames.append({"type": t.name, "seq": seq, "valid": True, "body_hex": body.hex(), "wire_hex": wire(body),
                       "fields": {k: (v.hex() if isinstance(v, bytes) else v) for k, v in f.items()}})
    good = encode_body(Message(MsgType.HEARTBEAT, 1, {"uptime_s": 7}))
    bad_crc = good[:-1] + bytes([good[-1] ^ 0x01])
    v2 = bytes([2]) + good[1:-4]
    v2 += struct.pack("<I", zlib.crc32(v2))
    unknown = bytes([1, 0x7F, 1, 0])
    unknown += struct.pack("<I", zlib.crc32(unknown))
    for name, body, reason in (("bad CRC", bad_crc, "crc"), ("protocol version 2", v2, "version"),
                               ("unknown type 0x7f", unknown, "unknown_type"), ("truncated", good[:5], "truncated")):
        frames.append({"type": name, "valid": False, "reason": reason, "body_hex": body.hex(), "wire_hex": wire(body)})
    frames.append({"type": "not COBS", "valid": False, "reason": "cobs", "wire_hex": "05112200"})
    (HERE / "v1.json").write_text(json.dumps({"version": 1, "crc": "CRC-32/IEEE (zlib.crc32) over version..payload",
                                              "framing": "COBS, 0x00 delimiter", "frames": frames}, indent=1))


BLOB = bytes((i * 7 + 3) & 0xFF for i in range(300))
CAPACITY = 1024


def _jsonable(f: dict) -> dict:
    return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in f.items()}


def push_scenarios() -> list[dict]:
    """Each scenario: a fresh receiver (capacity CAPACITY) gets the frames in order; after each it
    must answer exactly ``out`` (type and fields; the answer's own sequence number is the MCU's)."""
    tid, size = 7, 128
    begin = (MsgType.MODEL_BEGIN, {"transfer_id": tid, "total_size": len(BLOB), "chunk_size": size,
                                   "crc32": zlib.crc32(BLOB)})

    def chunk(i: int, t: int = tid) -> tuple:
        return (MsgType.MODEL_CHUNK, {"transfer_id": t, "index": i, "data": BLOB[i * size:(i + 1) * size]})

    end = (MsgType.MODEL_END, {"transfer_id": tid, "chunks": 3})
    plans = {
        "clean push": [begin, chunk(0), chunk(1), chunk(2), end],
        "a repeated chunk is ACKed again (its first ACK was lost)": [begin, chunk(0), chunk(0), chunk(1), chunk(2),
                                                                     end],
        "a repeated END is answered again": [begin, chunk(0), chunk(1), chunk(2), end, end],
        "a repeated BEGIN of the same transfer keeps the chunks": [begin, chunk(0), begin, chunk(1), chunk(2), end],
        "END with a chunk missing: NACK blob CRC": [begin, chunk(0), chunk(2), end],
        "chunk index out of range: NACK chunk": [begin, (MsgType.MODEL_CHUNK, {"transfer_id": tid, "index": 3,
                                                                              "data": b"x"})],
        "chunk longer than chunk_size: NACK chunk": [begin, (MsgType.MODEL_CHUNK, {"transfer_id": tid, "index": 0,
                                                                                  "data": b"y" * (size + 1)})],
        "chunk of a transfer never begun: no answer": [chunk(0, tid + 1), begin, chunk(0)],
        "too large for the MCU: NACK no space": [(MsgType.MODEL_BEGIN, {"transfer_id": tid, "total_size": CAPACITY + 1,
                                                                        "chunk_size": size, "crc32": 0})],
    }
    out = []
    for name, plan in plans.items():
        tx, rx = Link(), ModelReceiver(CAPACITY)
        steps = []
        for seq, (t, f) in enumerate(plan):
            frame = tx.send(t, f)
            answers = rx.receive(Message(t, seq, f))
            steps.append({"in": {"type": t.name, "fields": _jsonable(f)}, "in_wire_hex": frame.hex(),
                          "out": [{"type": a.name, "fields": af} for a, af in answers]})
        out.append({"name": name, "steps": steps})
    return out


def push_main() -> None:
    (HERE / "push_v1.json").write_text(json.dumps({
        "version": 1, "capacity": CAPACITY, "blob_hex": BLOB.hex(), "whole": WHOLE,
        "nack_reasons": {"1": "chunk (index out of range, too long, or not stored)", "2": "blob (missing chunk, size "
                         "or CRC-32)", "3": "no space"},
        "scenarios": push_scenarios()}, indent=1))


if __name__ == "__main__":
    main()
    push_main()
