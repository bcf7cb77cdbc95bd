import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.outbox import Outbox, OutboxFull

ROOT = Path(__file__).resolve().parents[2]


def test_fifo_peek_ack_and_bytes(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=10_000)
    for i in range(5):
        ob.put("event", "t/e", f"e{i}".encode())
    items = ob.peek(3)
    assert [i.payload for i in items] == [b"e0", b"e1", b"e2"]
    ob.ack([i.id for i in items])
    assert [i.payload for i in ob.peek()] == [b"e3", b"e4"] and len(ob) == 2
    assert ob.nbytes == sum(len(b"e3") + len("t/e") + 32 for _ in range(2))


def test_drop_policy_thins_telemetry_then_results_never_events(tmp_path):
    ob = Outbox(tmp_path / "o.db", max_bytes=3000)
    for i in range(30):
        ob.put("telemetry", "t", b"x" * 60)
    for i in range(5):
        ob.put("event", "e", b"y" * 60)
    assert ob.nbytes <= ob.max_bytes
    assert ob.stats()["queued_by_kind"]["event"] == 5
    assert ob.dropped.get("telemetry:thinned", 0) > 0
    # fill with events until even thinning cannot help: refused loudly, never silently dropped
    with pytest.raises(OutboxFull):
        for i in range(100):
            ob.put("event", "e", b"z" * 60)
    assert ob.refused == 1
    assert "event" not in "".join(ob.dropped)
    with pytest.raises(ValueError):
        ob.put("gossip", "t", b"")


def test_survives_sigkill_of_the_writer(tmp_path):
    code = ("import sys, os, signal; sys.path.insert(0, %r)\n"
            "from agent.outbox import Outbox\n"
            "ob = Outbox(sys.argv[1])\n"
            "[ob.put('event', 't', b'item%%d' %% i) for i in range(50)]\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n") % str(ROOT)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "o.db")], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    ob = Outbox(tmp_path / "o.db")
    assert len(ob) == 50 and ob.peek(1)[0].payload == b"item0"
