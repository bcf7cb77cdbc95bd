"""Nothing about the broker is silent (issue 17): an unreachable broker, a client-id takeover, a second
instance (agent on one state dir, serve on one registry). Real Mosquitto, real agent and controller processes.

On the old code: the agent logged nothing for a dead broker and told systemd READY/"serving" at
once; `fleetctl demo` showed devices=0; two agents with one id (or two `serve` on one registry)
pushed each other off every ~0.5 s forever, logging "Unspecified error"."""
from __future__ import annotations

import re
import socket
import subprocess
import sys

from tests.helpers.broker import Mosquitto, free_port
from tests.helpers.fleet import ENV, ROOT, agent_config, fleetctl, start_agent, stop
from tests.helpers.waiting import Probe, wait_for


def _read(p) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def _recv_all(sock: socket.socket, got: list[bytes]) -> None:
    try:
        while True:
            got.append(sock.recv(4096))
    except (BlockingIOError, socket.timeout):
        pass


def test_dead_broker_is_reported_and_ready_waits_for_the_connection(tmp_path):
    port = free_port()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.setblocking(False)
    cfg = agent_config(tmp_path, "pi-dead", f"mqtt://127.0.0.1:{port}")
    log = tmp_path / "pi-dead.log"
    env = {**ENV, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], env=env, cwd=ROOT,
                             stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    ctl_log = tmp_path / "serve.log"
    serve = subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", f"mqtt://127.0.0.1:{port}", "--db",
                              str(tmp_path / "r.db"), "serve"], env=ENV, cwd=ROOT, stdout=open(ctl_log, "wb"),
                             stderr=subprocess.STDOUT)
    got: list[bytes] = []
    broker = Mosquitto(tmp_path / "b", port=port)
    (tmp_path / "b").mkdir()
    try:
        where = f"127.0.0.1:{port}"
        for p in (log, ctl_log):   # both say so at WARNING, with the address and the reason
            wait_for(lambda p=p: re.search(rf"WARNING .*{where}.*connection refused", _read(p)), timeout=30,
                     what=f"a WARNING naming {where} and 'refused' in {p.name}")
        # a second serve on the same registry refuses, naming the first; --replica is let through
        db = tmp_path / "r.db"
        second = fleetctl("--broker", f"mqtt://127.0.0.1:{port}", "--db", str(db), "serve", timeout=60)
        assert second.returncode == 78, second.stderr
        assert f"registry {db} is already in use by pid {serve.pid}" in second.stderr
        assert "--replica" in second.stderr and "Traceback" not in second.stderr
        replica = subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", f"mqtt://127.0.0.1:{port}",
                                    "--db", str(db), "serve", "--replica", "r2"], env=ENV, cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=open(tmp_path / "replica.log", "wb"))
        try:
            wait_for(lambda: "cannot connect" in _read(tmp_path / "replica.log") or replica.poll() is not None,
                     timeout=30, what="the replica past the lock")
            assert replica.poll() is None, _read(tmp_path / "replica.log")
        finally:
            stop(replica)
        wait_for(lambda: (_recv_all(sock, got), any(b"STATUS=connecting to" in m and b"refused" in m for m in got))[1],
                 timeout=20, what="STATUS connecting to ... (refused)")
        assert not any(m.startswith(b"READY=1") for m in got), got
        # a bounded rate: with 0.2..1 s retries for a while, the agent said it once (per minute)
        assert len(re.findall(r"WARNING .*cannot connect", _read(log))) == 1, _read(log)
        broker.start()
        wait_for(lambda: (_recv_all(sock, got), any(m.startswith(b"READY=1") for m in got))[1], timeout=30,
                 what="READY=1 once connected")
        assert re.search(r"connected to .* after \d+ failed attempts", _read(log)), _read(log)
        # fleetctl demo on a dead broker fails with the reason at once instead of showing devices=0
        dead = f"mqtt://127.0.0.1:{free_port()}"
        demo = fleetctl("demo", "--broker", dead, "--duration", "30", timeout=60)
        assert demo.returncode == 1 and f"cannot use broker {dead}: connection refused" in demo.stderr, demo.stderr
        assert "devices" not in demo.stdout.lower()
    finally:
        stop(agent)
        stop(serve)
        broker.stop()
        sock.close()


def test_two_agents_with_one_id_stop_kicking_each_other(tmp_path, mosquitto):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    a = start_agent(agent_config(tmp_path / "a", "pi-twin", mosquitto.url), tmp_path / "a.log")
    b = start_agent(agent_config(tmp_path / "b", "pi-twin", mosquitto.url), tmp_path / "b.log")
    probe = None
    try:
        said = wait_for(lambda: next((p for p in ("a.log", "b.log") if "another process is using id pi-twin"
                                      in _read(tmp_path / p)), None), timeout=40,
                        what="ERROR: another process is using id pi-twin")
        text = _read(tmp_path / said)
        assert re.search(r"ERROR .*session taken over by another client with id pi-twin", text), text
        assert re.search(r"waiting \d+ s before reconnecting", text), text
        kicks = _read(mosquitto.log).count("already connected, closing old connection")
        assert kicks <= 8, kicks
        # it backs off (>= 30 s): meanwhile the other keeps its session, telemetry flows, nobody is kicked
        probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/pi-twin/telemetry",)).wait_subscribed()
        probe.wait(n=8, timeout=30, what="telemetry from the twin that kept its session")
        assert _read(mosquitto.log).count("already connected, closing old connection") == kicks
        # a second agent on the same state dir refuses to start, naming the holder
        same = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config",
                               str(tmp_path / "a" / "pi-twin.toml")], capture_output=True, text=True, env=ENV,
                              cwd=ROOT, timeout=60)
        assert same.returncode == 78, same.stderr
        assert f"state dir {tmp_path / 'a' / 'pi-twin'} (device pi-twin) is already in use by pid {a.pid}" \
            in same.stderr, same.stderr
    finally:
        if probe is not None:
            probe.close()
        stop(a)
        stop(b)
