"""Mosquitto with the shipped TLS + ACL config: mTLS, per-device confinement, controller-only commands."""
from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from conftest import free_port, mosquitto_binary, wait_for, wait_port
from controller.certs import init_ca, issue_client, issue_server
from controller.registry import Registry
from protocol.envelope import Envelope, encode
from test_skeleton import ENV, ROOT, device, stop

CONF = ROOT / "configs" / "mosquitto"


@pytest.fixture
def tls_broker(tmp_path):
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_server(pki, ["127.0.0.1", "localhost"])
    for name in ("controller", "pi-a", "pi-b"):
        issue_client(pki, name)
    other = tmp_path / "other-pki"
    init_ca(other)
    issue_client(other, "pi-a")
    port = free_port()
    text = (CONF / "mosquitto.conf").read_text()
    text = (text.replace("listener 8883", f"listener {port} 127.0.0.1")
            .replace("/etc/mosquitto/edgefleet/", f"{pki}/")
            .replace("persistence true", "persistence false")
            .replace("log_dest syslog", f"log_dest file {tmp_path / 'mosquitto.log'}")
            .replace("persistence_location /var/lib/mosquitto/", ""))
    shutil.copy(CONF / "acl", pki / "acl")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("user root\n" + text)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        wait_port(port)
        yield port, pki, other
    finally:
        proc.terminate()
        proc.wait(5)


class TlsClient:
    def __init__(self, port, ca, cert, key, client_id):
        self.got: list[tuple[str, bytes]] = []
        self.connected = threading.Event()
        self.refused: str | None = None
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        c.on_connect = lambda cl, u, f, rc, p=None: (self.connected.set() if rc == 0 else None)
        c.on_message = lambda cl, u, m: self.got.append((m.topic, bytes(m.payload)))
        self.c = c
        try:
            c.connect("127.0.0.1", port)
            c.loop_start()
        except (ssl.SSLError, OSError) as exc:
            self.refused = str(exc)

    def close(self):
        self.c.loop_stop()
        try:
            self.c.disconnect()
        except Exception:  # noqa: BLE001
            pass


def test_mtls_acl_and_controller_only_commands(tmp_path, tls_broker):
    port, pki, other = tls_broker
    url = f"mqtts://127.0.0.1:{port}"
    tls = f'ca_file = "{pki / "ca.pem"}"\n'
    ctl_cfg = tmp_path / "controller.toml"
    ctl_cfg.write_text(f'[mqtt]\nbroker = "{url}"\n{tls}cert_file = "{pki / "controller.pem"}"\n'
                       f'key_file = "{pki / "controller.key"}"\n[registry]\npath = "{tmp_path / "r.db"}"\n')
    agent_cfg = tmp_path / "pi-a.toml"
    agent_cfg.write_text(f'[device]\nid = "pi-a"\n[mqtt]\nbroker = "{url}"\n{tls}cert_file = "{pki / "pi-a.pem"}"\n'
                         f'key_file = "{pki / "pi-a.key"}"\n[telemetry]\ninterval_s = 0.3\n'
                         f'[state]\ndir = "{tmp_path / "pi-a"}"\n')
    db = tmp_path / "r.db"
    procs = [subprocess.Popen([sys.executable, "-m", "controller.cli", "--config", str(ctl_cfg), "serve"],
                              env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "ctl.log", "wb"))]
    time.sleep(1.0)
    procs.append(subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(agent_cfg)], env=ENV,
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "pi-a.log", "wb")))
    clients = []
    try:
        # a device connects with its certificate; state and telemetry land in the registry
        d = wait_for(lambda: (x := device(db, "pi-a")) and x.online and x.telemetry and x, timeout=20,
                     what="pi-a over mTLS")
        assert d.telemetry["link"]["connects"] == 1
        # the controller can command the device
        ping = subprocess.run([sys.executable, "-m", "controller.cli", "--config", str(ctl_cfg), "cmd", "pi-a", "ping"],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=30)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert json.loads(ping.stdout)["result"]["pong"] is True

        # another device may not write pi-a's topics, nor any command topic
        b = TlsClient(port, pki / "ca.pem", pki / "pi-b.pem", pki / "pi-b.key", "pi-b")
        clients.append(b)
        assert b.connected.wait(10)
        forged = encode(Envelope(kind="telemetry", sender="pi-a", body={"seq": 999999, "interval_s": 1}))
        b.c.publish("edgefleet/v1/dev/pi-a/telemetry", forged, 1).wait_for_publish(5)
        cmd = encode(Envelope(kind="cmd", sender="controller", body={"command": "ping", "args": {}}))
        b.c.publish("edgefleet/v1/dev/pi-a/cmd", cmd, 1).wait_for_publish(5)
        # but pi-b may publish its own telemetry (which the controller stores)
        own = encode(Envelope(kind="telemetry", sender="pi-b", body={"seq": 1, "interval_s": 1}))
        b.c.publish("edgefleet/v1/dev/pi-b/telemetry", own, 1).wait_for_publish(5)
        wait_for(lambda: (x := device(db, "pi-b")) is not None, what="pi-b's own telemetry")
        time.sleep(1.0)
        seqs = [r["body"]["seq"] for r in Registry(db, readonly=True).telemetry("pi-a", limit=1000)]
        assert 999999 not in seqs, "the forged telemetry must never reach the controller"
        tel = device(db, "pi-a").telemetry
        assert tel["msgs"]["rx"].get("cmd", 0) == 1, tel["msgs"]   # only the controller's ping arrived

        # no certificate, or one from another CA: no connection
        anon = TlsClient(port, pki / "ca.pem", None, None, "anon")
        clients.append(anon)
        assert anon.refused or not anon.connected.wait(3)
        rogue = TlsClient(port, pki / "ca.pem", other / "pi-a.pem", other / "pi-a.key", "pi-a-rogue")
        clients.append(rogue)
        assert rogue.refused or not rogue.connected.wait(3)
    finally:
        for c in clients:
            c.close()
        for p in procs:
            stop(p)


def test_certs_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "controller.cli", "certs", *a, "--dir", str(tmp_path)],  # noqa
                                    capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert run("init").returncode == 0
    again = run("init")
    assert again.returncode == 1 and "exists" in again.stderr
    assert run("issue", "pi-9").returncode == 0
    bad = run("issue", "pi/+")
    assert bad.returncode == 2 and "DEVICE_ID" in bad.stderr
    assert oct((tmp_path / "pi-9.key").stat().st_mode & 0o777) == "0o600"
    from cryptography import x509

    cert = x509.load_pem_x509_certificate((tmp_path / "pi-9.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=pi-9"
