"""The link codec byte by byte, with garbage, corruption and fuzz (h11-style input variations)."""
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from firmware_bridge.frames import Message, MsgType, decode_body, encode_body
from firmware_bridge.link import Link

VECTORS = Path(__file__).resolve().parents[2] / "firmware_bridge" / "vectors" / "v1.json"

MSGS = [
    (MsgType.HELLO, {"device_id": "mcu-1", "firmware": "1.2.3", "max_frame": 512, "samples_per_frame": 64,
                     "sensors": ["accel", "temp"]}),
    (MsgType.SENSOR_FRAME, {"timestamp_ms": 1234, "samples": [0.0, 1.5, 16.0]}),
    (MsgType.RESULT, {"timestamp_ms": 99, "label": 7, "confidence": 0.5}),
    (MsgType.INFER_REPLY, {"ref_seq": 3, "label": 2, "confidence": 0.25}),
    (MsgType.LOG, {"level": 2, "text": "boot ok"}),
    (MsgType.HEARTBEAT, {"uptime_s": 3600}),
    (MsgType.MODEL_BEGIN, {"transfer_id": 5, "total_size": 1000, "chunk_size": 256, "crc32": 0xDEADBEEF}),
    (MsgType.MODEL_CHUNK, {"transfer_id": 5, "index": 0, "data": bytes(range(256))}),
    (MsgType.MODEL_END, {"transfer_id": 5, "chunks": 4}),
    (MsgType.ACK, {"transfer_id": 5, "index": 0xFFFF}),
    (MsgType.NACK, {"transfer_id": 5, "index": 2, "reason": 1}),
]


def stream():
    tx = Link()
    return b"".join(tx.send(t, f) for t, f in MSGS)


def decoded(link):
    return [(m.type, m.fields) for m in link.events()]


def test_whole_stream_and_byte_by_byte_give_the_same_messages():
    data = stream()
    a = Link()
    a.receive_data(data)
    b = Link()
    for i in range(len(data)):
        b.receive_data(data[i:i + 1])
    want = [(t, f) for t, f in MSGS]
    assert decoded(a) == decoded(b) == [(t, _norm(f)) for t, f in want]
    assert not a.dropped and not b.dropped


def _norm(f):
    return {k: (pytest.approx(v) if isinstance(v, float) else v) for k, v in f.items()}


def test_garbage_between_frames_and_trailing_garbage():
    tx = Link()
    frames = [tx.send(t, f) for t, f in MSGS[:2]]
    rx = Link()
    rx.receive_data(b"\xde\xad\x00\x00" + frames[0] + b"\x13\x37\x00" + frames[1] + b"\x55\xaa")
    assert [m.type for m in rx.events()] == [MsgType.HELLO, MsgType.SENSOR_FRAME]
    assert sum(rx.dropped.values()) >= 2


def test_every_single_bit_flip_is_dropped_and_the_next_frame_survives():
    tx = Link()
    good = tx.send(MsgType.SENSOR_FRAME, {"timestamp_ms": 1, "samples": [1.0, 2.0]})
    nxt = tx.send(MsgType.HEARTBEAT, {"uptime_s": 5})
    for i in range(1, len(good) - 1):
        for bit in range(8):
            bad = bytearray(good)
            bad[i] ^= 1 << bit
            rx = Link()
            rx.receive_data(bytes(bad) + nxt)
            ev = rx.events()
            assert ev and ev[-1].type == MsgType.HEARTBEAT
            assert not any(m.type == MsgType.SENSOR_FRAME for m in ev)


def test_truncated_oversize_duplicate_and_gaps():
    tx = Link()
    f1 = tx.send(MsgType.HEARTBEAT, {"uptime_s": 1})
    f2 = tx.send(MsgType.HEARTBEAT, {"uptime_s": 2})
    tx.send(MsgType.HEARTBEAT, {"uptime_s": 3})        # lost on the line
    f4 = tx.send(MsgType.HEARTBEAT, {"uptime_s": 4})
    rx = Link(max_frame=64)
    rx.receive_data(f1 + f1 + f2[:4] + b"\x00" + b"\x07" * 500 + b"\x00" + f4)
    assert [m.fields["uptime_s"] for m in rx.events()] == [1, 4]
    assert rx.dropped["duplicate"] == 1 and rx.dropped["oversize"] == 1 and rx.dropped["seq_gap"] == 1
    assert sum(rx.dropped.values()) == 4  # the truncated frame too


def test_golden_vectors():
    vec = json.loads(VECTORS.read_text())
    assert vec["version"] == 1 and len(vec["frames"]) >= len(MsgType)
    for v in vec["frames"]:
        rx = Link()
        rx.receive_data(bytes.fromhex(v["wire_hex"]))
        ev = rx.events()
        if v["valid"]:
            assert len(ev) == 1 and ev[0].type.name == v["type"] and ev[0].seq == v["seq"]
            got = {k: (val.hex() if isinstance(val, bytes) else val) for k, val in ev[0].fields.items()}
            assert got == pytest.approx(v["fields"])
        else:
            assert not ev and rx.dropped[v["reason"]] == 1


@settings(max_examples=3000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_never_raises_never_sticks(data):
    rx = Link(max_frame=128)
    rx.receive_data(data)
    rx.events()
    rx.receive_data(Link().send(MsgType.HEARTBEAT, {"uptime_s": 9}))
    assert rx.events()[-1].fields["uptime_s"] == 9   # resynchronised after anything
