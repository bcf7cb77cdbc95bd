"""Model push without I/O: ModelPush and ModelReceiver talking through two real Links, byte by byte.

Time is an input, so timeouts are tested exactly (before, at and after a deadline) in
milliseconds; frames are lost by corrupting their bytes on the "wire".
"""
import os
import zlib

import pytest
from hypothesis import given, settings, strategies as st

from firmware_bridge.frames import Message, MsgType
from firmware_bridge.link import Link
from firmware_bridge.push import (WHOLE, ModelPush, ModelReceiver, PushState, PushUsageError, max_chunk_size)

BLOB = os.urandom(1000)


class Wire:
    """Agent Link -> bytes -> MCU Link -> ModelReceiver -> bytes -> agent Link.

    ``lose(direction, n)`` decides whether the n-th frame sent in that direction ("down" or "up")
    is corrupted on the line (one bit flipped, so the receiver drops it by CRC)."""

    def __init__(self, max_frame=256, capacity=1 << 16, fail_chunk=None, lose=lambda d, n: False):
        self.agent, self.mcu = Link(max_frame), Link(max_frame)
        self.rx = ModelReceiver(capacity, fail_chunk)
        self.lose = lose
        self.sent = {"down": [], "up": []}

    def _carry(self, direction, src, dst, out):
        data = b""
        for t, f in out:
            frame = bytearray(src.send(t, f))
            self.sent[direction].append((t, dict(f)))
            if self.lose(direction, len(self.sent[direction]) - 1):
                frame[len(frame) // 2] ^= 0x10
            data += frame
        dst.receive_data(bytes(data))
        return dst.events()

    def down(self, out):
        answers = [a for m in self._carry("down", self.agent, self.mcu, out) for a in self.rx.receive(m)]
        return self._carry("up", self.mcu, self.agent, answers)


def drive(push, wire, t=0.0):
    """Run to the end: answers are handled as they come, otherwise time jumps to the deadline."""
    inbox = wire.down(push.start(t))
    for _ in range(100000):
        if push.done:
            return t
        if inbox:
            out = push.receive(inbox.pop(0), t)
        else:
            t = push.deadline
            out = push.tick(t)
        inbox += wire.down(out)
    raise AssertionError("push never finished")


def kinds(sent):
    return [(t.name, f.get("index")) for t, f in sent]


def test_clean_push_sends_begin_chunks_in_order_end_and_the_mcu_gets_the_exact_blob():
    p, w = ModelPush(BLOB, 7, 100), Wire()
    drive(p, w)
    assert p.state is PushState.DONE and p.result.ok and p.result.reason == ""
    assert kinds(w.sent["down"]) == [("MODEL_BEGIN", None)] + [("MODEL_CHUNK", i) for i in range(10)] + \
        [("MODEL_END", None)]
    begin = w.sent["down"][0][1]
    assert begin["total_size"] == 1000 and begin["chunk_size"] == 100 and begin["crc32"] == zlib.crc32(BLOB)
    assert w.rx.blob == BLOB and w.rx.verified == 1
    assert p.result.retransmits == 0 and p.result.chunks == 10 and p.result.transfer_id == 7
    assert not w.agent.dropped and not w.mcu.dropped


def test_chunk_size_limit_is_exactly_what_fits_the_frame():
    for max_frame in (64, 256, 1024):
        size = max_chunk_size(max_frame)
        link = Link(max_frame)
        link.send(MsgType.MODEL_CHUNK, {"transfer_id": 1, "index": 2, "data": b"\x01" * size})
        with pytest.raises(ValueError):
            link.send(MsgType.MODEL_CHUNK, {"transfer_id": 1, "index": 2, "data": b"\x01" * (size + 1)})
    p, w = ModelPush(BLOB, 1, max_chunk_size(128)), Wire(max_frame=128)
    drive(p, w)
    assert p.result.ok and w.rx.blob == BLOB


def test_lost_chunk_is_resent_at_the_deadline_not_before():
    lost = {4}  # down frame 4 = chunk 3 (frame 0 is BEGIN)
    p, w = ModelPush(BLOB, 1, 100, ack_timeout_s=0.5), Wire(lose=lambda d, n: d == "down" and n in lost)
    inbox = w.down(p.start(10.0))
    while inbox:
        inbox += w.down(p.receive(inbox.pop(0), 10.0))
    assert p.current == 3 and p.deadline == pytest.approx(10.5)
    assert p.tick(10.49) == []
    out = p.tick(10.5)
    assert [(t.name, f["index"]) for t, f in out] == [("MODEL_CHUNK", 3)]
    inbox = w.down(out)
    t = 10.5
    while not p.done:
        out = p.receive(inbox.pop(0), t) if inbox else p.tick(t := p.deadline)
        inbox += w.down(out)
    assert p.result.ok and p.result.retransmits == 1 and w.rx.blob == BLOB
    assert p.result.elapsed_s == pytest.approx(0.5)


def test_lost_ack_gets_the_chunk_acked_again_and_stale_acks_are_ignored():
    p, w = ModelPush(BLOB, 1, 100), Wire(lose=lambda d, n: d == "up" and n == 2)  # the ACK of chunk 2
    drive(p, w)
    assert p.result.ok and p.result.retransmits == 1 and w.rx.blob == BLOB
    assert [i for t, f in w.sent["down"] if t == MsgType.MODEL_CHUNK for i in [f["index"]]].count(2) == 2
    q = ModelPush(BLOB, 1, 100)
    q.start(0.0)
    q.receive(Message(MsgType.ACK, 0, {"transfer_id": 1, "index": 0}), 0.0)
    assert q.receive(Message(MsgType.ACK, 1, {"transfer_id": 1, "index": 0}), 0.0) == []   # duplicate
    assert q.receive(Message(MsgType.ACK, 2, {"transfer_id": 1, "index": 9}), 0.0) == []   # from the future
    assert q.ignored["stale_ack"] == 2 and q.current == 1


def test_nack_resends_at_once_without_waiting():
    fails = {4: 2}

    def fail(i):
        if fails.get(i):
            fails[i] -= 1
            return True
        return False

    p, w = ModelPush(BLOB, 1, 100), Wire(fail_chunk=fail)
    t = drive(p, w, t=5.0)
    assert t == 5.0                       # no timeout was needed
    assert p.result.ok and p.nacks == 2 and p.result.retransmits == 2 and w.rx.blob == BLOB


def test_lost_begin_is_repeated_with_chunk_0():
    p, w = ModelPush(BLOB, 1, 100), Wire(lose=lambda d, n: d == "down" and n == 0)
    drive(p, w)
    assert kinds(w.sent["down"])[:4] == [("MODEL_BEGIN", None), ("MODEL_CHUNK", 0), ("MODEL_BEGIN", None),
                                         ("MODEL_CHUNK", 0)]
    assert p.result.ok and w.rx.blob == BLOB


def test_retries_are_bounded_and_failure_is_sticky():
    p, w = ModelPush(BLOB, 1, 100, ack_timeout_s=1.0, retries=3), Wire(lose=lambda d, n: d == "down" and n >= 3)
    t = drive(p, w)
    assert p.state is PushState.FAILED and p.result.reason == "timeout" and "chunk 2" in p.result.detail
    assert p.result.retransmits == 3 and t == pytest.approx(4.0) and p.deadline is None
    assert p.tick(t + 100) == [] and p.receive(Message(MsgType.ACK, 0, {"transfer_id": 1, "index": 1}), t) == []
    assert p.state is PushState.FAILED


def test_a_chunk_that_is_always_nacked_fails_after_the_retries():
    p, w = ModelPush(BLOB, 1, 100, retries=4), Wire(fail_chunk=lambda i: i == 6)
    drive(p, w)
    assert p.result.reason == "too_many_nacks" and p.nacks == 5 and "chunk 6" in p.result.detail


def test_no_space_fails_at_once_and_a_final_nack_fails_with_its_reason():
    p, w = ModelPush(BLOB, 1, 100), Wire(capacity=999)
    t = drive(p, w)
    assert p.result.reason == "no_space" and t == 0.0 and len(w.sent["down"]) == 2
    q = ModelPush(b"abc", 2, 100)
    q.start(0.0)
    assert [t.name for t, _ in q.receive(Message(MsgType.ACK, 0, {"transfer_id": 2, "index": 0}), 0.1)] == \
        ["MODEL_END"]
    assert q.state is PushState.ENDING and q.deadline == pytest.approx(5.1)
    q.receive(Message(MsgType.NACK, 1, {"transfer_id": 2, "index": WHOLE, "reason": 2}), 0.2)
    assert not q.result.ok and q.result.reason == "blob_crc"


def test_lost_final_ack_resends_end_and_the_mcu_verifies_once():
    p, w = ModelPush(BLOB, 1, 100, end_timeout_s=3.0), Wire(lose=lambda d, n: d == "up" and n == 10)
    t = drive(p, w)
    assert p.result.ok and t == pytest.approx(3.0)
    assert [x.name for x, _ in w.sent["down"]].count("MODEL_END") == 2 and w.rx.verified == 1


def test_other_transfers_and_other_messages_are_ignored():
    p = ModelPush(BLOB, 1, 100)
    p.start(0.0)
    assert p.receive(Message(MsgType.ACK, 0, {"transfer_id": 2, "index": 0}), 0.0) == []
    assert p.receive(Message(MsgType.NACK, 0, {"transfer_id": 2, "index": WHOLE, "reason": 3}), 0.0) == []
    assert p.receive(Message(MsgType.HEARTBEAT, 0, {"uptime_s": 1}), 0.0) == []
    assert p.ignored["other_transfer"] == 2 and p.state is PushState.SENDING and p.current == 0


def test_abort_is_terminal_and_misuse_raises():
    p = ModelPush(BLOB, 1, 100)
    with pytest.raises(PushUsageError):
        p.receive(Message(MsgType.ACK, 0, {"transfer_id": 1, "index": 0}), 0.0)
    p.start(0.0)
    with pytest.raises(PushUsageError):
        p.start(0.0)
    p.abort(1.0, "mcu_reset")
    assert p.result.reason == "mcu_reset" and p.result.elapsed_s == 1.0
    p.abort(2.0, "port_lost")
    assert p.result.reason == "mcu_reset"
    for bad in ((b"", 1, 100), (BLOB, 1, 0), (b"x" * 70000, 1, 1)):
        with pytest.raises(ValueError):
            ModelPush(*bad)


def test_receiver_refuses_what_does_not_belong():
    rx = ModelReceiver(1000)
    assert rx.receive(Message(MsgType.MODEL_CHUNK, 0, {"transfer_id": 1, "index": 0, "data": b"a"})) == []
    rx.receive(Message(MsgType.MODEL_BEGIN, 0, {"transfer_id": 1, "total_size": 10, "chunk_size": 4,
                                                "crc32": zlib.crc32(b"0123456789")}))
    nack = rx.receive(Message(MsgType.MODEL_CHUNK, 1, {"transfer_id": 1, "index": 3, "data": b"a"}))
    assert nack == [(MsgType.NACK, {"transfer_id": 1, "index": 3, "reason": 1})]           # index out of range
    assert rx.receive(Message(MsgType.MODEL_CHUNK, 2, {"transfer_id": 1, "index": 0, "data": b"01234"}))[0][0] == \
        MsgType.NACK                                                                          # longer than a chunk
    for i, part in enumerate((b"0123", b"4567")):
        rx.receive(Message(MsgType.MODEL_CHUNK, 3 + i, {"transfer_id": 1, "index": i, "data": part}))
    end = Message(MsgType.MODEL_END, 9, {"transfer_id": 1, "chunks": 3})
    assert rx.receive(end) == [(MsgType.NACK, {"transfer_id": 1, "index": WHOLE, "reason": 2})]  # chunk 2 missing
    rx.receive(Message(MsgType.MODEL_CHUNK, 10, {"transfer_id": 1, "index": 2, "data": b"89"}))
    assert rx.receive(end) == [(MsgType.ACK, {"transfer_id": 1, "index": WHOLE})] and rx.blob == b"0123456789"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.booleans(), max_size=80), st.lists(st.booleans(), max_size=80), st.integers(1, 240),
       st.integers(0, 4))
def test_any_loss_pattern_ends_in_the_exact_blob_or_a_bounded_failure(down, up, chunk, retries):
    blob = bytes(range(256)) * 3
    lose = lambda d, n: (down if d == "down" else up)[n] if n < len(down if d == "down" else up) else False
    p, w = ModelPush(blob, 3, chunk, retries=retries), Wire(lose=lose)
    drive(p, w)
    n = -(-len(blob) // chunk)
    assert len(w.sent["down"]) <= 1 + (n + 1) * (retries + 1) + retries   # BEGIN repeats only before chunk 0
    if p.result.ok:
        assert w.rx.blob == blob
    else:
        assert p.result.reason == "timeout" and p.result.retransmits >= retries


msgs = st.builds(lambda ack, tid, idx, reason: Message(MsgType.ACK if ack else MsgType.NACK, 0,
                                                       {"transfer_id": tid, "index": idx, "reason": reason}),
                 st.booleans(), st.sampled_from([1, 2]), st.one_of(st.integers(0, 12), st.just(WHOLE)),
                 st.integers(0, 255))


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(msgs, st.floats(0, 3)), max_size=60))
def test_random_answers_at_random_times_never_raise_and_only_send_the_current_step(events):
    p = ModelPush(BLOB, 1, 100, ack_timeout_s=0.5, retries=2)
    p.start(0.0)
    t = 0.0
    for m, dt in events:
        t += dt
        for step in (lambda: p.tick(t), lambda: p.receive(m, t)):
            for typ, f in step():
                assert typ in (MsgType.MODEL_BEGIN, MsgType.MODEL_CHUNK, MsgType.MODEL_END)
                if typ == MsgType.MODEL_CHUNK:
                    assert f["index"] == p.current and f["data"] == BLOB[100 * p.current:100 * p.current + 100]
        if p.done:
            assert p.deadline is None and p.result is not None


def test_push_vectors_match_the_reference_receiver():
    """firmware_bridge/vectors/push_v1.json: what a firmware's receiver must answer, frame by frame."""
    import json
    from pathlib import Path

    vec = json.loads((Path(__file__).resolve().parents[2] / "firmware_bridge" / "vectors" / "push_v1.json").read_text())
    assert len(vec["scenarios"]) >= 9
    for sc in vec["scenarios"]:
        link, rx = Link(), ModelReceiver(vec["capacity"])
        for step in sc["steps"]:
            link.receive_data(bytes.fromhex(step["in_wire_hex"]))
            [m] = link.events()
            assert m.type.name == step["in"]["type"], sc["name"]
            got = [{"type": t.name, "fields": f} for t, f in rx.receive(m)]
            assert got == step["out"], sc["name"]
    clean = next(sc for sc in vec["scenarios"] if sc["name"] == "clean push")
    assert b"".join(bytes.fromhex(s["in"]["fields"]["data"]) for s in clean["steps"][1:4]) == \
        bytes.fromhex(vec["blob_hex"])
