"""The unit files verify, score "OK" or better on systemd's exposure scale, and sd_notify works."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if not exe:
        pytest.fail("systemd-analyze is missing: apt-get install -y systemd (CI installs it)")
    return exe


def staged(tmp_path: Path) -> list[Path]:
    """Copies whose ExecStart points at an existing binary (verify checks that it exists)."""
    out = []
    for u in UNITS:
        text = re.sub(r"/opt/edgefleet/bin/(edge-agent|fleetctl)", sys.executable, u.read_text())
        p = tmp_path / u.name
        p.write_text(text)
        out.append(p)
    return out


def test_units_exist():
    assert {u.name for u in UNITS} == {"edge-agent.service", "fleet-controller.service",
                                       "fleet-offload-worker@.service"}


def test_every_unit_verifies(tmp_path):
    for unit in staged(tmp_path):
        p = subprocess.run([analyze(), "verify", str(unit)], capture_output=True, text=True)
        problems = [l for l in (p.stdout + p.stderr).splitlines()
                    if l.strip() and "Failed to put bus name" not in l and "does not exist" not in l]
        assert p.returncode == 0 and not problems, f"{unit.name}: {p.stdout}{p.stderr}"


@pytest.mark.parametrize("unit,limit", [("edge-agent.service", 4.9), ("fleet-controller.service", 4.9)])
def test_exposure_score_is_ok_or_better(tmp_path, unit, limit):
    path = next(u for u in staged(tmp_path) if u.name == unit)
    p = subprocess.run([analyze(), "security", "--offline=true", str(path)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", p.stdout)
    assert m, p.stdout[-500:] + p.stderr
    score = float(m.group(1))
    print(f"\n{unit}: exposure {score} {m.group(2)}")
    assert score <= limit


def _notify_socket(tmp_path, abstract: bool):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"edgefleet-test-{os.getpid()}-{tmp_path.name}"
        s.bind("\0" + name)
        return s, "@" + name
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    return s, path


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_against_a_real_datagram_socket(tmp_path, abstract):
    from agent.sdnotify import Notifier, watchdog_interval

    sock, addr = _notify_socket(tmp_path, abstract)
    sock.settimeout(2)
    n = Notifier(addr)
    assert n.ready("up") and n.watchdog() and n.status("fine")
    assert sock.recv(1024) == b"READY=1\nSTATUS=up"
    assert sock.recv(1024) == b"WATCHDOG=1"
    assert sock.recv(1024) == b"STATUS=fine"
    assert Notifier("").notify("READY=1") is False  # outside systemd: a no-op
    os.environ["WATCHDOG_USEC"], os.environ["WATCHDOG_PID"] = "4000000", str(os.getpid())
    try:
        assert watchdog_interval() == 2.0
    finally:
        del os.environ["WATCHDOG_USEC"], os.environ["WATCHDOG_PID"]
    sock.close()


def test_stuck_loop_stops_the_watchdog_pings():
    import time

    from agent.watchdog import LoopWatchdog

    class Count:
        n = 0

        def watchdog(self):
            self.n += 1
            return True

    c = Count()
    wd = LoopWatchdog(c, interval=0.05, stale_after=0.15)
    wd.start()
    for _ in range(10):           # a live loop beats
        wd.beat()
        time.sleep(0.03)
    alive = c.n
    time.sleep(0.5)               # the loop is "stuck": no beats
    stuck = c.n - alive
    wd.stop()
    assert alive >= 3 and stuck <= 3 and wd.withheld >= 5


def test_agent_process_speaks_sd_notify(tmp_path, mosquitto):
    sock, addr = _notify_socket(tmp_path, abstract=False)
    sock.settimeout(10)
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[device]\nid = "sd-1"\n[mqtt]\nbroker = "{mosquitto.url}"\n[state]\ndir = "{tmp_path / "s"}"\n')
    env = {**os.environ, "NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "400000", "PYTHONPATH": str(ROOT)}
    env.pop("WATCHDOG_PID", None)
    p = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    got: list[bytes] = []
    try:
        deadline = __import__("time").monotonic() + 15
        while __import__("time").monotonic() < deadline and not (
                any(m.startswith(b"READY=1") for m in got) and sum(m == b"WATCHDOG=1" for m in got) >= 3
                and any(m.startswith(b"STATUS=connected") for m in got)):
            got.append(sock.recv(1024))
        assert any(m.startswith(b"READY=1") for m in got), got
        assert sum(m == b"WATCHDOG=1" for m in got) >= 3, got
        assert any(m.startswith(b"STATUS=connected") for m in got), got
        p.send_signal(signal.SIGTERM)
        assert p.wait(5) == 0
        rest = []
        sock.settimeout(1)
        try:
            while True:
                rest.append(sock.recv(1024))
        except socket.timeout:
            pass
        assert b"STOPPING=1" in rest
    finally:
        if p.poll() is None:
            p.kill()
        sock.close()
