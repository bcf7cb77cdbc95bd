"""The on-disk outbox: FIFO, byte cap with the per-kind drop policy, crash safety, threads."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from agent.core.outbox import ITEM_OVERHEAD, DropPolicy, Item, Outbox, OutboxFull

ROOT = Path(__file__).resolve().parents[2]


def size(topic: str, payload: bytes) -> int:
    return len(payload) + len(topic) + ITEM_OVERHEAD


def test_fifo_peek_ack_len_and_bytes(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=10_000)
    for i in range(5):
        ob.put("event", "t/e", f"e{i}".encode(), qos=1, retain=i == 4, msg_id=f"m{i}")
    items = ob.peek(3)
    assert [i.payload for i in items] == [b"e0", b"e1", b"e2"]
    assert items[0] == Item(items[0].id, "event", "t/e", b"e0", 1, False, "m0")
    assert ob.peek(3) == items                       # peek does not consume
    assert ob.ack([i.id for i in items] + [99999]) == 3   # unknown ids are ignored
    rest = ob.peek()
    assert [i.payload for i in rest] == [b"e3", b"e4"] and rest[1].retain and len(ob) == 2
    assert ob.nbytes == 2 * size("t/e", b"e3")
    s = ob.stats()
    assert (s["queued"], s["queued_by_kind"], s["put"], s["sent"], s["dropped"]) == (2, {"event": 2}, 5, 3, {})
    assert ob.ack([]) == 0
    with pytest.raises(ValueError):
        ob.peek(0)


def test_state_survives_reopen(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=10_000)
    for i in range(4):
        ob.put("telemetry" if i % 2 else "update", "t", bytes([i]) * 10)
    n, b = len(ob), ob.nbytes
    ob.close()
    again = Outbox(tmp_path / "o.db", max_bytes=10_000)
    assert (len(again), again.nbytes) == (n, b)
    assert [i.payload[0] for i in again.peek()] == [0, 1, 2, 3]


def test_telemetry_is_thinned_every_other_oldest_first(tmp_path):
    per = size("tel", b"x" * 68)                     # 100 bytes per sample
    ob = Outbox(tmp_path / "o.db", max_bytes=40 * per)
    for seq in range(40):
        ob.put("telemetry", "tel", seq.to_bytes(4, "big") + b"x" * 64)
    assert len(ob) == 40
    ob.put("telemetry", "tel", (40).to_bytes(4, "big") + b"x" * 64)   # one more: room must be made
    kept = [int.from_bytes(i.payload[:4], "big") for i in ob.peek(100)]
    gone = sorted(set(range(41)) - set(kept))
    # freed one sample plus 5 % headroom: 3 samples, every other, oldest first
    assert gone == [0, 2, 4]
    assert kept[-30:] == list(range(11, 41))         # recent data stays dense
    assert ob.stats()["dropped"] == {"telemetry": {"thinned": 3}}
    assert ob.nbytes <= ob.max_bytes


def test_results_go_oldest_first_after_telemetry_and_events_are_never_dropped(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=2500)
    for i in range(10):
        ob.put("telemetry", "t", b"x" * 68)          # 100 B each
    for i in range(10):
        ob.put("result", "r", i.to_bytes(1, "big") + b"r" * 67)
    for i in range(15):                               # 3500 B put in all
        ob.put("event", "e", i.to_bytes(1, "big") + b"y" * 67)
    assert ob.nbytes <= ob.max_bytes
    q = ob.stats()["queued_by_kind"]
    assert q["event"] == 15 and "telemetry" not in q   # all telemetry went before any result
    results = [i.payload[0] for i in ob.peek(100) if i.kind == "result"]
    assert 0 < len(results) < 10 and results == list(range(10 - len(results), 10))   # oldest went first
    # fill with events until nothing droppable is left: then refused loudly, never dropped
    puts = 15
    with pytest.raises(OutboxFull, match="never dropped"):
        for i in range(100):
            ob.put("event", "e", b"z" * 68)
            puts += 1
    assert ob.refused == 1 and ob.stats()["queued_by_kind"] == {"event": puts}
    assert "event" not in ob.stats()["dropped"]
    # a new droppable item finding no room is itself dropped, counted
    ob.put("telemetry", "t", b"x" * 68)
    ob.put("result", "r", b"x" * 68)
    d = ob.stats()["dropped"]
    assert d["telemetry"]["full"] == 1 and d["result"]["full"] == 1 and d["telemetry"]["thinned"] == 10


def test_too_large_items(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=2000)
    ob.put("telemetry", "t", b"x" * 5000)
    assert len(ob) == 0 and ob.stats()["dropped"] == {"telemetry": {"too_large": 1}}
    with pytest.raises(OutboxFull, match="larger than the whole outbox"):
        ob.put("update", "u", b"x" * 5000)


def test_msg_id_makes_put_idempotent(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=10_000)
    ob.put("event", "e", b"a", msg_id="id-1")
    ob.put("event", "e", b"a", msg_id="id-1")
    ob.put("event", "e", b"b")
    ob.put("event", "e", b"c")                        # no msg_id: never deduplicated
    assert len(ob) == 3 and ob.stats()["dropped"] == {"event": {"duplicate": 1}}
    ob.ack([ob.peek(1)[0].id])
    ob.put("event", "e", b"a", msg_id="id-1")         # delivered already: queued again
    assert len(ob) == 3


def test_custom_policy_and_bad_input(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=1100, policy=DropPolicy(thin=(), oldest=("telemetry",)))
    for i in range(12):
        ob.put("telemetry", "t", bytes([i]) * 68)
    assert [i.payload[0] for i in ob.peek()][0] > 0   # oldest first instead of thinning
    assert "oldest" in ob.stats()["dropped"]["telemetry"]
    with pytest.raises(ValueError, match="unknown kind"):
        DropPolicy(thin=("gossip",))
    with pytest.raises(ValueError, match="not both"):
        DropPolicy(thin=("telemetry",), oldest=("telemetry",))
    for args, err in [(("gossip", "t", b""), ValueError), (("event", "", b""), ValueError),
                      (("event", "t", "text"), TypeError), (("event", "t", b"", 3), ValueError)]:
        with pytest.raises(err):
            ob.put(*args)
    with pytest.raises(ValueError):
        Outbox(tmp_path / "x.db", synchronous="sometimes")


def test_survives_sigkill_in_the_middle_of_writing(tmp_path):
    """A writer is killed while putting as fast as it can; everything it reported is there, in order."""
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from agent.core.outbox import Outbox\n"
            "ob = Outbox(sys.argv[1])\n"
            "i = 0\n"
            "while True:\n"
            "    ob.put('event', 't', b'item%%d' %% i)\n"
            "    print(i, flush=True)\n"
            "    i += 1\n") % str(ROOT)
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "o.db")], stdout=subprocess.PIPE, text=True)
    last = -1
    while last < 300:
        last = int(p.stdout.readline())
    p.send_signal(signal.SIGKILL)
    assert p.wait(5) == -signal.SIGKILL
    ob = Outbox(tmp_path / "o.db")
    got = [i.payload for i in ob.peek(100_000)]
    assert len(got) >= last + 1 and got == [b"item%d" % i for i in range(len(got))]
    assert ob.nbytes == sum(size("t", g) for g in got)


def test_one_writer_and_one_drainer_thread(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=1 << 20)
    n = 2000
    received: list[bytes] = []

    def writer():
        for i in range(n):
            ob.put("event", "t", b"%d" % i)

    def drainer():
        while len(received) < n:
            batch = ob.peek(50)
            received.extend(i.payload for i in batch)
            ob.ack([i.id for i in batch])

    threads = [threading.Thread(target=writer), threading.Thread(target=drainer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert received == [b"%d" % i for i in range(n)] and len(ob) == 0 and ob.nbytes == 0


def test_a_corrupt_file_is_moved_aside(tmp_path):
    (tmp_path / "o.db").write_bytes(b"this is not a database, the SD card ate it" * 100)
    ob = Outbox(tmp_path / "o.db")
    assert ob.recovered_from is not None and ob.recovered_from.exists()
    ob.put("event", "t", b"fresh")
    assert len(Outbox(tmp_path / "o.db")) == 1


def test_an_older_schema_is_migrated(tmp_path):
    db = sqlite3.connect(tmp_path / "o.db")
    db.execute("CREATE TABLE outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, topic TEXT NOT NULL, "
               "payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, created REAL NOT NULL, "
               "size INTEGER NOT NULL)")
    db.execute("INSERT INTO outbox(kind, topic, payload, qos, retain, created, size) VALUES('event','t',x'01',1,0,0,"
               "34)")
    db.commit()
    db.close()
    ob = Outbox(tmp_path / "o.db")
    ob.put("event", "t", b"\x02", msg_id="m")
    assert [(i.payload, i.msg_id) for i in ob.peek()] == [(b"\x01", None), (b"\x02", "m")]


ops = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from(["telemetry", "result", "event", "update"]), st.integers(0, 300)),
    st.tuples(st.just("ack"), st.integers(1, 20))), max_size=60)


@settings(max_examples=40, deadline=None)
@given(ops)
def test_invariants_under_random_operations(seq):
    """Bytes never exceed the cap, counters match the file, never-dropped kinds are never lost."""
    with tempfile.TemporaryDirectory() as d:
        ob = Outbox(Path(d) / "o.db", max_bytes=4096)
        must_keep: list[bytes] = []       # never-dropped items put and not yet acked
        n = 0
        for op in seq:
            if op[0] == "put":
                payload = n.to_bytes(4, "big") + b"p" * op[2]
                n += 1
                try:
                    ob.put(op[1], "t", payload)
                except OutboxFull:
                    continue
                if op[1] in ("event", "update"):
                    must_keep.append(payload)
            else:
                batch = ob.peek(op[1])
                ob.ack([i.id for i in batch])
                acked = {i.payload for i in batch}
                must_keep = [p for p in must_keep if p not in acked]
            assert ob.nbytes <= ob.max_bytes
            items = ob.peek(10_000)
            assert len(items) == len(ob) and sum(size(i.topic, i.payload) for i in items) == ob.nbytes
            assert [i.id for i in items] == sorted(i.id for i in items)
            assert [i.payload for i in items if i.kind in ("event", "update")] == must_keep
        ob.close()
