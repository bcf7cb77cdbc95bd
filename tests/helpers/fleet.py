"""Agents, controllers and fleetctl as real subprocesses (PYTHONPATH = this tree), agent configs."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .waiting import Probe, wait_for

ROOT = Path(__file__).resolve().parents[2]
# FLEETCTL_DEPLOY_SOAK: rollouts in tests soak only where a test asks for it (``deploy --soak``)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "FLEETCTL_DEPLOY_SOAK": "0s"}


def agent_config(tmp: Path, dev: str, broker: str, interval: float = 0.3, extra: str = "") -> Path:
    p = tmp / f"{dev}.toml"
    p.write_text(f'[device]\nid = "{dev}"\n[mqtt]\nbroker = "{broker}"\nkeepalive = 5\nmin_backoff_s = 0.2\n'
                 f'max_backoff_s = 1.0\n[telemetry]\ninterval_s = {interval}\n[state]\ndir = "{tmp / dev}"\n' + extra)
    return p


def start_agent(cfg: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)


def start_controller(broker: str, db: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", broker, "--db", str(db), "serve"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)


def fleetctl(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller.cli", *args], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=ROOT, timeout=timeout)


def device(db: "Path | str", dev: str):
    """The registry's view of one device, or None (no registry yet, or not known). ``db``: a
    SQLite path, or any registry URL (``postgresql://…``)."""
    from controller.registry import Registry, RegistryError

    if isinstance(db, Path) and not db.exists():
        return None
    try:
        reg = Registry(db, readonly=True)
    except RegistryError:
        return None
    try:
        return reg.device(dev)
    finally:
        reg.close()


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def controller_online(port: int, timeout: float = 60) -> None:
    """Wait for the controller's retained ``online`` state (it is subscribed from then on). The bound is
    generous: a controller imports numpy/onnx and opens its registry first, which takes 15 s and more
    on a loaded 2-core machine (the wait returns the moment it is online)."""
    probe = Probe(port, subscribe=("edgefleet/v1/ctl/state",), protocol="3.1.1")
    try:
        wait_for(lambda: any(b'"online"' in p for _, p, _ in probe.seen()), timeout=timeout, what="controller online")
    finally:
        probe.close()


def start_fleet(tmp_path: Path, url: str):
    """A controller on ``url`` (started and online) and ``add_agent(dev, **agent_config kw)``.

    Returns ``(db, add_agent, procs)``; the caller stops ``procs``."""
    procs: list[subprocess.Popen] = []
    db = tmp_path / "registry.db"
    procs.append(start_controller(url, db, tmp_path / "controller.log"))
    # agents start once the controller is subscribed (its retained state says online), so the
    # tests see every event from an agent's first second
    controller_online(int(url.rsplit(":", 1)[1]))

    def add_agent(dev: str, **kw) -> subprocess.Popen:
        p = start_agent(agent_config(tmp_path, dev, url, **kw), tmp_path / f"{dev}.log")
        procs.append(p)
        return p

    return db, add_agent, procs
