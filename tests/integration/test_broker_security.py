"""Mosquitto with the shipped TLS + ACL config: mTLS, per-device confinement, controller-only commands."""
from __future__ import annotations

import json
import os
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

from controller.certs import init_ca, issue_client, issue_server
from controller.registry import Registry
from protocol.envelope import Envelope, encode
from tests.helpers.broker import free_port, mosquitto_binary, wait_port
from tests.helpers.fleet import ENV, ROOT, device, stop
from tests.helpers.waiting import wait_for

CONF = ROOT / "configs" / "mosquitto"


USERS = ("controller", "operator", "pi-a", "pi-b", "offload-1")


def start_broker(tmp_path: Path, auth: str = "mtls"):
    """The shipped mosquitto.conf and acl, with paths and port rewritten for a test directory;
    ``auth="password"`` switches to the documented password alternative (TLS server auth only)."""
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_server(pki, ["127.0.0.1", "localhost"])
    for name in USERS:
        issue_client(pki, name)
    other = tmp_path / "other-pki"
    init_ca(other)
    issue_client(other, "pi-a")
    port = free_port()
    # the conf.d snippet, behind what Debian's main file would set (a log file; no persistence here)
    text = f"log_dest file {tmp_path / 'mosquitto.log'}\n" + (CONF / "edgefleet.conf").read_text()
    text = (text.replace("listener 8883", f"listener {port} 127.0.0.1")
            .replace("/etc/mosquitto/edgefleet/", f"{pki}/"))
    if auth == "password":
        text = (text.replace("\nrequire_certificate true\nuse_identity_as_username true\n", "\n")
                .replace("#require_certificate false", "require_certificate false")
                .replace("#password_file", "password_file"))
        assert "password_file" in text and "use_identity_as_username true" not in text
        passwd = pki / "passwd"
        passwd.touch()
        for name in USERS:
            subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b", str(passwd),
                            name, f"pw-{name}"], check=True)
    shutil.copy(CONF / "acl", pki / "acl")
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(("user root\n" if os.geteuid() == 0 else "") + text)
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(conf)], stderr=subprocess.PIPE)
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"mosquitto did not start: {proc.communicate()[1]!r}") from None
    return proc, port, pki, other


@pytest.fixture
def tls_broker(tmp_path):
    proc, port, pki, other = start_broker(tmp_path)
    try:
        yield port, pki, other
    finally:
        proc.terminate()
        proc.wait(5)


class TlsClient:
    """A paho client over TLS that records PUBACK/SUBACK reason codes (MQTT 5) and messages."""

    def __init__(self, port, ca, cert, key, client_id, v5=False, password=None):
        self.got: list[tuple[str, bytes]] = []
        self.acks: dict[int, str] = {}
        self.connected = threading.Event()
        self.finished = threading.Event()       # the first connection attempt has an outcome
        self.refused: str | None = None
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311)
        c.tls_set(ca_certs=str(ca), certfile=str(cert) if cert else None, keyfile=str(key) if key else None,
                  cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if password is not None:
            c.username_pw_set(client_id, password)
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.finished.set()
        c.on_connect_fail = lambda *a: self.finished.set()
        c.on_message = self._on_message
        c.on_publish = lambda cl, u, mid, rc, p=None: self.acks.__setitem__(mid, str(rc))
        self.c = c
        try:
            c.connect("127.0.0.1", port)
            c.loop_start()
        except (ssl.SSLError, OSError) as exc:
            self.refused = str(exc)

    def _on_connect(self, cl, u, f, rc, p=None):
        if rc == 0:
            self.connected.set()
        else:
            self.refused = str(rc)
        self.finished.set()

    def rejected(self, timeout: float = 5.0) -> bool:
        """True if the broker turned this client away (TLS alert, CONNACK refusal or hang-up)."""
        return bool(self.refused) or (self.finished.wait(timeout) and not self.connected.is_set())

    def _on_message(self, cl, u, m):
        with self._lock:
            self.got.append((m.topic, bytes(m.payload)))

    def topics(self) -> list[str]:
        with self._lock:
            return [t for t, _ in self.got]

    def publish(self, topic: str, payload: bytes = b"x") -> str:
        """Publish at QoS 1 and return the broker's PUBACK reason ('Success', 'Not authorized')."""
        info = self.c.publish(topic, payload, 1)
        info.wait_for_publish(5)
        return wait_for(lambda: self.acks.get(info.mid), timeout=30, what=f"PUBACK for {topic}")

    def subscribe(self, *topics: str) -> None:
        done = threading.Event()
        self.c.on_subscribe = lambda *a: done.set()
        self.c.subscribe([(t, 1) for t in topics])
        assert done.wait(5), topics

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
                       f'key_file = "{pki / "controller.key"}"\n[registry]\npath = "{tmp_path / "r.db"}"\n'
                       f'[cli]\ncert_file = "{pki / "operator.pem"}"\nkey_file = "{pki / "operator.key"}"\n')
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
        ping = subprocess.run([sys.executable, "-m", "controller.cli", "--config", str(ctl_cfg), "cmd", "pi-a", "ping", "--json"],
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
        assert anon.rejected()
        rogue = TlsClient(port, pki / "ca.pem", other / "pi-a.pem", other / "pi-a.key", "pi-a-rogue")
        clients.append(rogue)
        assert rogue.rejected()
    finally:
        for c in clients:
            c.close()
        for p in procs:
            stop(p)


@pytest.mark.parametrize("auth", ["mtls", "password"])
def test_acl_confines_each_device_and_only_the_controller_commands(tmp_path, auth):
    """Probe clients speak MQTT 5, so every denied publish comes back as 'Not authorized' in its
    PUBACK; the controller's subscriber must never see one of them."""
    proc, port, pki, other = start_broker(tmp_path, auth)
    ca = pki / "ca.pem"
    clients: list[TlsClient] = []

    def connect(name: str) -> TlsClient:
        if auth == "mtls":
            c = TlsClient(port, ca, pki / f"{name}.pem", pki / f"{name}.key", name, v5=True)
        else:
            c = TlsClient(port, ca, None, None, name, v5=True, password=f"pw-{name}")
        clients.append(c)
        assert c.connected.wait(10), f"{name} could not connect ({auth})"
        return c

    base = "edgefleet/v1"
    try:
        ctl = connect("controller")
        ctl.subscribe(f"{base}/#", "homeassistant/#")
        a, b, worker = connect("pi-a"), connect("pi-b"), connect("offload-1")
        a.subscribe(f"{base}/dev/pi-a/cmd", f"{base}/dev/pi-a/req")
        # pi-b tries to read pi-a's commands and requests: Mosquitto grants the subscription but
        # never delivers (the read check is per message)
        b.subscribe(f"{base}/dev/pi-a/cmd", f"{base}/dev/pi-a/req", f"{base}/dev/pi-b/cmd", f"{base}/dev/pi-b/reply/#")
        worker.subscribe(f"$share/workers/{base}/offload/req")

        denied = [f"{base}/dev/pi-a/telemetry", f"{base}/dev/pi-a/state", f"{base}/dev/pi-a/events",
                  f"{base}/dev/pi-a/reply/x", f"{base}/dev/pi-a/data/chunk", f"{base}/dev/pi-a/cmd",
                  f"{base}/dev/pi-b/cmd", f"{base}/dev/pi-b/req", f"{base}/group/all/cmd", f"{base}/ctl/state",
                  "homeassistant/sensor/pi-a/cpu/config", "homeassistant/sensor/edgefleet_pi-a/cpu/config",
                  "edgefleet/v2/dev/pi-b/telemetry", "other/topic"]
        for topic in denied:
            assert b.publish(topic, b"forged") == "Not authorized", topic
        allowed = [f"{base}/dev/pi-b/state", f"{base}/dev/pi-b/events", f"{base}/dev/pi-b/data/update",
                   "homeassistant/sensor/pi-b/cpu/config", f"{base}/dev/pi-b/telemetry"]
        for topic in allowed:
            assert b.publish(topic) == "Success", topic
        wait_for(lambda: f"{base}/dev/pi-b/telemetry" in ctl.topics(), what="pi-b's own telemetry at the controller")

        # only the controller commands: it reaches pi-a, and pi-b (subscribed to pi-a's cmd) sees nothing
        assert ctl.publish(f"{base}/dev/pi-a/cmd", b"ping") == "Success"
        assert ctl.publish(f"{base}/dev/pi-a/req", b"infer") == "Success"
        assert ctl.publish(f"{base}/dev/pi-b/cmd", b"ping-b") == "Success"
        wait_for(lambda: f"{base}/dev/pi-b/cmd" in b.topics(), what="pi-b's own command")
        wait_for(lambda: len(a.topics()) == 2, what="pi-a's command and request")
        assert sorted(a.topics()) == [f"{base}/dev/pi-a/cmd", f"{base}/dev/pi-a/req"]

        # offload: a device publishes a request, the worker gets it from the shared subscription
        # and answers into the device's own reply subtree
        assert b.publish(f"{base}/offload/req", b"offload-me") == "Success"
        wait_for(lambda: f"{base}/offload/req" in worker.topics(), what="the worker's request")
        assert worker.publish(f"{base}/dev/pi-b/reply/offload", b"answer") == "Success"
        assert worker.publish(f"{base}/dev/pi-b/cmd", b"no") == "Not authorized"
        wait_for(lambda: f"{base}/dev/pi-b/reply/offload" in b.topics(), what="the offload answer at pi-b")
        # deadline scheduling: a device routes to one worker's own topic and reads the workers'
        # status; a worker asks peers for work and forwards stolen work, and writes only its own status
        worker.subscribe(f"{base}/offload/req/offload-1", f"{base}/offload/steal/offload-1")
        b.subscribe(f"{base}/offload/workers/+")
        assert b.publish(f"{base}/offload/req/offload-1", b"routed") == "Success"
        wait_for(lambda: f"{base}/offload/req/offload-1" in worker.topics(), what="the routed request")
        assert worker.publish(f"{base}/offload/workers/offload-1", b"status") == "Success"
        wait_for(lambda: f"{base}/offload/workers/offload-1" in b.topics(), what="the worker status at pi-b")
        assert worker.publish(f"{base}/offload/req/offload-2", b"stolen") == "Success"
        assert worker.publish(f"{base}/offload/steal/offload-2", b"steal") == "Success"
        assert worker.publish(f"{base}/offload/workers/offload-2", b"forged") == "Not authorized"
        assert b.publish(f"{base}/offload/workers/offload-1", b"forged") == "Not authorized"
        assert b.publish(f"{base}/offload/steal/offload-1", b"forged") == "Not authorized"

        time.sleep(0.3)
        with ctl._lock:
            forged = [t for t, p in ctl.got if p == b"forged"]
        assert forged == [], forged
        assert b.topics().count(f"{base}/dev/pi-a/cmd") == 0 and f"{base}/dev/pi-a/req" not in b.topics()

        # who may not connect at all
        if auth == "mtls":
            anon = TlsClient(port, ca, None, None, "anon")
            rogue = TlsClient(port, ca, other / "pi-a.pem", other / "pi-a.key", "pi-a-rogue")
        else:
            anon = TlsClient(port, ca, None, None, "anon")                  # no username at all
            rogue = TlsClient(port, ca, None, None, "pi-a", password="guess")
        clients += [anon, rogue]
        assert not b.rejected(0)    # the check can tell an accepted client from a rejected one
        for c in (anon, rogue):
            assert c.rejected(), c.refused
        assert a.c.is_connected()   # the failed attempts did not push the real pi-a off
    finally:
        for c in clients:
            c.close()
        proc.terminate()
        proc.wait(5)


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
