"""sd_notify against a real AF_UNIX datagram socket standing in for systemd, and the loop watchdog."""
from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest

from agent.core import sdnotify
from agent.core.sdnotify import Notifier, watchdog_interval
from agent.core.watchdog import LoopWatchdog


@pytest.fixture(params=["path", "abstract"])
def systemd_socket(request, tmp_path):
    """A bound datagram socket like systemd's, and the NOTIFY_SOCKET value that names it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "abstract":
        name = f"edgefleet-test-{os.getpid()}-{tmp_path.name}"
        s.bind("\0" + name)
        addr = "@" + name
    else:
        addr = str(tmp_path / "notify.sock")
        s.bind(addr)
    s.settimeout(2)
    yield s, addr
    s.close()


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


def test_notifier_sends_each_state_as_one_datagram(systemd_socket):
    sock, addr = systemd_socket
    n = Notifier(addr)
    assert n.enabled
    assert n.ready("up") and n.status("fine") and n.watchdog() and n.stopping()
    assert [sock.recv(4096) for _ in range(4)] == [b"READY=1\nSTATUS=up", b"STATUS=fine", b"WATCHDOG=1",
                                                   b"STOPPING=1"]
    assert n.sent == 4 and n.failed == 0
    n.close()


def test_status_text_cannot_inject_another_assignment(systemd_socket):
    sock, addr = systemd_socket
    n = Notifier(addr)
    assert n.status("broker down\nREADY=1")
    assert sock.recv(4096) == b"STATUS=broker down READY=1"


def test_module_helpers_follow_notify_socket(systemd_socket, monkeypatch):
    sock, addr = systemd_socket
    monkeypatch.setenv("NOTIFY_SOCKET", addr)
    assert sdnotify.ready() and sdnotify.status("serving") and sdnotify.watchdog()
    assert sdnotify.notify("RELOADING=1") and sdnotify.stopping("bye")
    assert [sock.recv(4096) for _ in range(5)] == [b"READY=1", b"STATUS=serving", b"WATCHDOG=1", b"RELOADING=1",
                                                   b"STOPPING=1\nSTATUS=bye"]
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert sdnotify.ready() is False and sdnotify.watchdog() is False   # outside systemd: no-op
    assert drain(sock) == []


@pytest.mark.parametrize("addr", ["", "relative/notify.sock", "@"])
def test_no_socket_or_unusable_address_is_a_noop(addr):
    n = Notifier(addr)
    assert not n.enabled and n.notify("READY=1") is False and n.ready() is False


def test_a_vanished_systemd_is_reported_not_raised(tmp_path):
    path = tmp_path / "gone.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    n = Notifier(str(path))
    assert n.watchdog()
    s.close()
    path.unlink()
    assert n.watchdog() is False and n.failed == 1


@pytest.mark.parametrize("usec,pid,expected", [
    (None, None, None),
    ("4000000", "self", 2.0),
    ("4000000", None, 2.0),             # WATCHDOG_PID is optional
    ("4000000", "1", None),             # inherited by a child: not ours to ping
    ("4000000", "12x", None),
    ("soon", "self", None),
    ("0", "self", None),
    ("-5", "self", None),
])
def test_watchdog_interval_from_environment(monkeypatch, usec, pid, expected):
    for key, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    assert watchdog_interval() == expected


def test_tick_pings_only_while_beats_are_fresh(systemd_socket):
    sock, addr = systemd_socket
    wd = LoopWatchdog(Notifier(addr), interval=10.0, stale_after=5.0)
    t0 = wd.last_beat
    assert wd.tick(t0 + 1.0) is True
    assert wd.tick(t0 + 6.0) is False and wd.tick(t0 + 16.0) is False   # stuck: withheld
    wd.beat()
    assert wd.tick(wd.last_beat + 0.1) is True
    got = drain(sock)
    assert got[0] == b"WATCHDOG=1"
    assert got[1].startswith(b"STATUS=event loop unresponsive for 6.0 s")
    assert got[2:] == [b"STATUS=event loop responsive again", b"WATCHDOG=1"]   # one status per transition
    assert (wd.pings, wd.withheld) == (2, 2)
    with pytest.raises(ValueError):
        LoopWatchdog(Notifier(addr), interval=0)


def test_a_stuck_event_loop_stops_the_pings(systemd_socket):
    """A real asyncio loop with the heartbeat task; the pinger thread pings a real socket."""
    sock, addr = systemd_socket
    wd = LoopWatchdog(Notifier(addr), interval=0.05)

    async def main() -> dict[str, list[bytes]]:
        beat = asyncio.create_task(wd.heartbeat(), name="watchdog-heartbeat")
        wd.start()
        phases = {}
        await asyncio.sleep(0.6)
        phases["alive"] = drain(sock)
        time.sleep(0.8)                       # the loop is stuck: no task runs
        phases["stuck"] = drain(sock)
        await asyncio.sleep(0.6)
        phases["recovered"] = drain(sock)
        wd.stop()
        beat.cancel()
        return phases

    phases = asyncio.run(main())
    pings = {k: v.count(b"WATCHDOG=1") for k, v in phases.items()}
    assert pings["alive"] >= 5, phases
    # at most the ping or two already due when the loop stopped; ~16 were withheld
    assert pings["stuck"] <= 2 and wd.withheld >= 8, (pings, wd.withheld)
    assert any(m.startswith(b"STATUS=event loop unresponsive") for m in phases["stuck"]), phases["stuck"]
    assert pings["recovered"] >= 5, phases
    assert b"STATUS=event loop responsive again" in phases["recovered"]
