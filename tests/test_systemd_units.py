"""The unit files verify, score "OK" or better on systemd's exposure scale, and the agent speaks sd_notify.

Needs systemd-analyze (Debian package: systemd). Missing, the tests fail: they never skip.
"""
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


# systemd-analyze verify prints nothing for a clean unit; these lines come from the machine, not the unit
_ENVIRONMENT_NOISE = ("Failed to put bus name", "Failed to connect to bus")


def verify(unit: Path) -> list[str]:
    p = subprocess.run([analyze(), "verify", str(unit)], capture_output=True, text=True)
    return [l for l in (p.stdout + p.stderr).splitlines()
            if l.strip() and not any(n in l for n in _ENVIRONMENT_NOISE)]


def test_every_unit_verifies(tmp_path):
    for unit in staged(tmp_path):
        problems = verify(unit)
        assert not problems, f"{unit.name}: " + "\n".join(problems)


def test_verify_catches_what_staging_hides_and_nothing_else(tmp_path):
    """The shipped file differs from the staged copy only by the ExecStart binary, and verify
    really reports mistakes (so the test above can fail)."""
    original = verify(ROOT / "systemd" / "edge-agent.service")
    assert original and all("/opt/edgefleet/bin/edge-agent" in l and "not executable" in l for l in original), original
    agent = next(u for u in staged(tmp_path) if u.name == "edge-agent.service")
    broken = tmp_path / "broken.service"
    broken.write_text(agent.read_text().replace("ProtectHome=yes", "ProtectHome=perhaps")
                      .replace("Type=notify", "Type=notfiy"))
    out = "\n".join(verify(broken))
    assert "protect home" in out.lower() and "service type" in out.lower(), out


def exposure(unit: Path) -> tuple[float, str]:
    p = subprocess.run([analyze(), "security", "--offline=true", str(unit)], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", p.stdout)
    assert m, p.stdout[-500:] + p.stderr
    return float(m.group(1)), m.group(2)


# systemd's bands: <= 4.9 "OK", <= 6.9 "MEDIUM"... The limits hold what the units reach today.
@pytest.mark.parametrize("unit,limit", [("edge-agent.service", 2.0), ("fleet-controller.service", 1.5),
                                        ("fleet-offload-worker@.service", 1.5)])
def test_exposure_score_is_ok_or_better(tmp_path, unit, limit):
    path = next(u for u in staged(tmp_path) if u.name == unit)
    if unit.endswith("@.service"):  # security needs an instance of a template
        inst = path.with_name(unit.replace("@.", "@digits-large."))
        path.rename(inst)
        path = inst
    score, band = exposure(path)
    print(f"\n{unit}: exposure {score} {band}")
    assert band == "OK" and score <= limit, (score, band)


def test_agent_unit_has_what_the_agent_relies_on():
    text = (ROOT / "systemd" / "edge-agent.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure", "StartLimitBurst=",
                 "StartLimitIntervalSec=", "User=edgefleet", "SupplementaryGroups=dialout", "StateDirectory=edgefleet",
                 "ConfigurationDirectory=edgefleet", "LogsDirectory=edgefleet", "DeviceAllow=char-ttyUSB rw",
                 "DeviceAllow=char-ttyACM rw", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                 "CapabilityBoundingSet=\n", "MemoryMax=",
                 "ExecStart=/opt/edgefleet/bin/edge-agent run --config /etc/edgefleet/agent.toml"):
        assert line in text, line


def _notify_socket(tmp_path, abstract: bool):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"edgefleet-test-{os.getpid()}-{tmp_path.name}"
        s.bind("\0" + name)
        return s, "@" + name
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    return s, path


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


def test_offload_worker_unit_has_its_own_identity_and_config():
    """On the old unit the worker ran with controller.toml (the controller's certificate) and no --id,
    so the ACL's offload block was never used."""
    text = (ROOT / "systemd" / "fleet-offload-worker@.service").read_text()
    (line,) = [l for l in text.splitlines() if l.startswith("ExecStart=")]
    assert "--config /etc/edgefleet/offload-%i.toml" in line and "--id offload-%i" in line, line
    assert "controller.toml" not in line
    acl = (ROOT / "configs" / "mosquitto" / "acl").read_text()
    assert "user offload-" in acl and "topic readwrite edgefleet/v1/offload/workers/offload-" in acl
    doc = (ROOT / "docs" / "install-on-a-board.md").read_text()
    assert "fleet-offload-worker@digits-large" in doc and "/etc/edgefleet/offload-digits-large.toml" in doc
    offload_doc = (ROOT / "docs" / "offload.md").read_text()
    assert "--id offload-1" in offload_doc and "fleetctl certs issue offload-1" in offload_doc


def test_documentation_paths_are_installed_by_the_documented_step():
    doc = (ROOT / "docs" / "install-on-a-board.md").read_text()
    for unit in UNITS:
        for line in unit.read_text().splitlines():
            if line.startswith("Documentation="):
                path = line.split("file://", 1)[1]
                assert path.startswith("/usr/share/doc/edgefleet/"), line
                assert (ROOT / "docs" / Path(path).name).exists(), f"{unit.name}: {path} has no source in docs/"
    assert "sudo install -m 0644 docs/*.md /usr/share/doc/edgefleet/" in doc


def test_config_errors_do_not_restart_loop():
    """The agent and fleetctl serve exit 78 (EX_CONFIG) on a config they cannot use; every unit stops there."""
    from agent.cli import EX_CONFIG as AGENT
    from controller.cli.serve import EX_CONFIG as SERVE

    assert AGENT == SERVE == 78
    for unit in UNITS:
        assert "\nRestartPreventExitStatus=78\n" in unit.read_text(), unit.name


def test_keys_are_group_readable_for_the_service_user():
    """docs say how User=edgefleet reads root-owned keys: 0640 root:edgefleet (and why not LoadCredential=)."""
    doc = (ROOT / "docs" / "install-on-a-board.md").read_text()
    assert "sudo install -m 0640 -o root -g edgefleet pi-07.key /etc/edgefleet/" in doc
    assert "LoadCredential=" in doc and "0640 root:edgefleet" in doc
    for unit in UNITS:
        assert "LoadCredential" not in unit.read_text()
