"""Client ids on the shipped Mosquitto config (issue 15, item 7): a device cannot push another client
off the broker with its client id, and the CLI has its own identity, so ``fleetctl serve`` stays
connected while ``fleetctl cmd`` and ``fleetctl telemetry --follow`` run."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers.waiting import wait_for
from tests.integration.test_broker_security import TlsClient, start_broker
from tests.helpers.fleet import ENV, ROOT, device, stop


@pytest.fixture
def site(tmp_path):
    proc, port, pki, other = start_broker(tmp_path)      # issues the operator's certificate too
    try:
        yield port, pki
    finally:
        proc.terminate()
        proc.wait(5)


def broker_log(tmp_path) -> str:
    return (tmp_path / "mosquitto.log").read_text(errors="replace")


def connected_as(tmp_path, name: str) -> int:
    """Connections the broker accepted for user ``name`` (the certificate's CN), whatever the client id."""
    return len(re.findall(rf"New client connected from \S+ as \S+ \(.*u'{re.escape(name)}'\)", broker_log(tmp_path)))


def fleetctl(cfg, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "controller.cli", "--config", str(cfg), *args],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)


def test_no_client_pushes_another_off_and_the_cli_has_its_own_identity(tmp_path, site):
    port, pki = site
    url = f"mqtts://127.0.0.1:{port}"
    tls = f'ca_file = "{pki / "ca.pem"}"\n'
    db = tmp_path / "r.db"
    serve_cfg = tmp_path / "serve.toml"
    serve_cfg.write_text(f'[mqtt]\nbroker = "{url}"\n{tls}cert_file = "{pki / "controller.pem"}"\n'
                         f'key_file = "{pki / "controller.key"}"\n[registry]\npath = "{db}"\n')
    cli_cfg = tmp_path / "controller.toml"     # the same file plus the CLI's own certificate
    cli_cfg.write_text(serve_cfg.read_text() + f'[cli]\ncert_file = "{pki / "operator.pem"}"\n'
                                               f'key_file = "{pki / "operator.key"}"\n')
    agent_cfg = tmp_path / "pi-a.toml"
    agent_cfg.write_text(f'[device]\nid = "pi-a"\n[mqtt]\nbroker = "{url}"\n{tls}cert_file = "{pki / "pi-a.pem"}"\n'
                         f'key_file = "{pki / "pi-a.key"}"\n[telemetry]\ninterval_s = 0.3\n'
                         f'[state]\ndir = "{tmp_path / "pi-a"}"\n')
    procs = [subprocess.Popen([sys.executable, "-m", "controller.cli", "--config", str(serve_cfg), "serve"],
                              env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "ctl.log", "wb"))]
    wait_for(lambda: connected_as(tmp_path, "controller") == 1, timeout=20, what="fleetctl serve connected")
    procs.append(subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(agent_cfg)], env=ENV,
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "pi-a.log", "wb")))
    clients = []

    def telemetry_after(seq):
        return wait_for(lambda: (d := device(db, "pi-a")) and d.online and d.telemetry and
                        d.telemetry["seq"] > seq and d.telemetry, timeout=20, what=f"pi-a telemetry after {seq}")

    try:
        tel = telemetry_after(0)
        assert tel["link"]["connects"] == 1
        # 1. pi-b's certificate with pi-a's client id, then with the controller's: the broker names the
        #    connection after the certificate (pi-b), so neither pi-a nor fleetctl serve is pushed off
        for victim in ("pi-a", "controller"):
            attacker = TlsClient(port, pki / "ca.pem", pki / "pi-b.pem", pki / "pi-b.key", victim, v5=True)
            clients.append(attacker)
            assert attacker.connected.wait(10), attacker.refused
            assert attacker.publish("edgefleet/v1/dev/pi-b/telemetry", b"{}") == "Success"
            attacker.close()
        assert "closing old connection" not in broker_log(tmp_path), broker_log(tmp_path)
        tel = telemetry_after(tel["seq"])
        assert tel["link"]["connects"] == 1, tel["link"]          # pi-a was never disconnected

        # 2. the CLI under the controller's certificate would push serve off: refused, with what to do
        shared = fleetctl(serve_cfg, "cmd", "pi-a", "ping")
        assert shared.returncode == 1 and "[cli]" in shared.stderr and "certs issue" in shared.stderr, shared.stderr
        assert connected_as(tmp_path, "controller") == 1

        # 3. the CLI under its own certificate: commands and a live follow while serve stays connected
        ping = fleetctl(cli_cfg, "cmd", "pi-a", "ping", "--json")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert json.loads(ping.stdout)["result"]["pong"] is True
        follow = subprocess.Popen([sys.executable, "-m", "controller.cli", "--config", str(cli_cfg), "telemetry",
                                   "--follow", "--device", "pi-a", "--json"], stdout=subprocess.PIPE, text=True,
                                  env=ENV, cwd=ROOT)
        try:
            lines = [json.loads(follow.stdout.readline()) for _ in range(2)]
        finally:
            follow.send_signal(signal.SIGINT)
            follow.wait(10)
        assert [x["device"] for x in lines] == ["pi-a", "pi-a"] and follow.returncode == 0
        assert connected_as(tmp_path, "operator") == 2
        assert connected_as(tmp_path, "controller") == 1             # serve connected once, never again
        assert "closing old connection" not in broker_log(tmp_path)
        assert procs[0].poll() is None
        assert telemetry_after(lines[-1]["body"]["seq"])["link"]["connects"] == 1
    finally:
        for c in clients:
            c.close()
        for p in procs:
            stop(p)


def test_the_operator_commands_and_watches_devices_and_nothing_more(tmp_path, site):
    port, pki = site
    base = "edgefleet/v1"
    op = TlsClient(port, pki / "ca.pem", pki / "operator.pem", pki / "operator.key", "fleetctl-x", v5=True)
    try:
        assert op.connected.wait(10), op.refused
        for topic in (f"{base}/dev/pi-a/cmd", f"{base}/dev/pi-a/req"):
            assert op.publish(topic) in ("Success", "No matching subscribers"), topic
        for topic in (f"{base}/ctl/state", f"{base}/ctl/desired/pi-a", f"{base}/dev/pi-a/telemetry",
                      f"{base}/dev/pi-a/state", f"{base}/group/all/cmd", "homeassistant/sensor/pi-a/cpu/config"):
            assert op.publish(topic) == "Not authorized", topic
    finally:
        op.close()
