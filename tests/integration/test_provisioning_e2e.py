"""Provisioning on a real Mosquitto with the dynamic-security plugin: claim → accept → the board
connects with its own certificate and can use only its own subtree; 50 claims in one command;
bad claims refused with reasons; revocation removes the board; audit lists the actions."""
from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from controller.registry import Registry
from protocol.claims import make_request, new_key
from tests.helpers.dynsec import start_dynsec_broker
from tests.helpers.fleet import ENV, ROOT, device, fleetctl, stop
from tests.helpers.waiting import until, wait_for

LIFETIME = 20.0


class TlsProbe:
    """A paho client with a fleet certificate: records what it sees."""

    def __init__(self, broker, name: str, subscribe: tuple[str, ...] = ()) -> None:
        cert, key = broker.identity(name)
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Condition()
        self.subacks: list = []
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{name}-{id(self)}", protocol=mqtt.MQTTv5)
        self.c.tls_set(ca_certs=str(broker.pki / "ca.pem"), certfile=str(cert), keyfile=str(key),
                       cert_reqs=ssl.CERT_REQUIRED)
        self.c.on_message = self._msg
        self.c.on_subscribe = lambda c, u, mid, rcs, p=None: self._sub(rcs)
        ok = threading.Event()
        self.c.on_connect = lambda *a, **k: ok.set()
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        assert ok.wait(10), f"{name} could not connect"
        for s in subscribe:
            self.c.subscribe(s, 1)
        wait_for(lambda: len(self.subacks) >= len(subscribe), 10, what="subacks")

    def _sub(self, rcs) -> None:
        with self.lock:
            self.subacks.append([int(getattr(r, "value", r)) for r in rcs])

    def _msg(self, c, u, m) -> None:
        with self.lock:
            self.messages.append((m.topic, bytes(m.payload)))
            self.lock.notify_all()

    def seen(self, pred=lambda t, p: True) -> list[tuple[str, bytes]]:
        with self.lock:
            return [m for m in self.messages if pred(*m)]

    def publish(self, topic: str, payload: bytes) -> None:
        self.c.publish(topic, payload, 1).wait_for_publish(5)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prov")
    b = start_dynsec_broker(tmp / "broker")
    db = tmp / "registry.db"
    cfg = tmp / "controller.toml"
    ocert, okey = b.identity("operator")
    cfg.write_text(b.mqtt_toml("controller") + f'[registry]\npath = "{db}"\n[cli]\ncert_file = "{ocert}"\n'
                   f'key_file = "{okey}"\n[provisioning]\nenabled = true\nca_dir = "{b.pki}"\n'
                   f'cert_lifetime_s = {LIFETIME}\nauto_accept = ["auto-*"]\n')
    serve = subprocess.Popen([sys.executable, "-m", "controller.cli", "--config", str(cfg), "serve"],
                             stdout=open(tmp / "controller.log", "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    probe = TlsProbe(b, "operator", ("edgefleet/v1/ctl/state",))
    wait_for(lambda: probe.seen(lambda t, p: b'"online"' in p), 20, what="controller online")
    probe.close()
    agents: list[subprocess.Popen] = []
    ns = type("Fleet", (), {})()
    ns.broker, ns.db, ns.cfg, ns.tmp, ns.agents = b, db, cfg, tmp, agents
    ns.ctl = lambda *a, **kw: fleetctl("--config", str(cfg), *a, **kw)

    def add_agent(dev: str, interval: float = 0.3) -> subprocess.Popen:
        ccert, ckey = b.identity("claim")
        own = tmp / dev
        p = tmp / f"{dev}.toml"
        p.write_text(f'[device]\nid = "{dev}"\n[mqtt]\nbroker = "{b.url}"\nkeepalive = 5\nmin_backoff_s = 0.2\n'
                     f'max_backoff_s = 1.0\nca_file = "{b.pki / "ca.pem"}"\ncert_file = "{own / "own.pem"}"\n'
                     f'key_file = "{own / "own.key"}"\n[telemetry]\ninterval_s = {interval}\n[state]\ndir = "{own}"\n'
                     f'[homeassistant]\nenabled = false\n'
                     f'[provisioning]\nclaim_cert = "{ccert}"\nclaim_key = "{ckey}"\ntags = ["lab"]\n')
        proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(p)],
                                stdout=open(tmp / f"{dev}.log", "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        agents.append(proc)
        return proc

    ns.add_agent = add_agent
    yield ns
    for a in agents:
        stop(a)
    stop(serve)
    b.stop()


def pending_ids(fleet) -> list[str]:
    r = fleet.ctl("devices", "pending", "--json")
    assert r.returncode == 0, r.stderr
    return [c["device_id"] for c in json.loads(r.stdout)["claims"]]


def test_claim_accept_own_certificate_own_subtree(fleet):
    fleet.add_agent("pi-1")
    wait_for(lambda: "pi-1" in pending_ids(fleet), 30, what="pi-1's claim pending")
    r = fleet.ctl("devices", "accept", "pi-1")
    assert r.returncode == 0 and "accepted 1 of 1" in r.stdout, r.stdout + r.stderr
    own = fleet.tmp / "pi-1" / "own.pem"
    wait_for(own.exists, 30, what="pi-1's own certificate on disk")
    assert oct((fleet.tmp / "pi-1" / "own.key").stat().st_mode & 0o777) == "0o600"
    wait_for(lambda: (d := device(fleet.db, "pi-1")) is not None and d.online, 30, what="pi-1 online with its cert")
    log = (fleet.tmp / "pi-1.log").read_text()
    assert "claimed: pi-1 now has its own certificate" in log

    # confinement: the board's own certificate reaches its own subtree only
    watcher = TlsProbe(fleet.broker, "operator", ("edgefleet/v1/#",))
    board = TlsProbe(fleet.broker, "pi-1", ("edgefleet/v1/dev/pi-1/cmd", "edgefleet/v1/dev/pi-2/cmd"))
    assert board.subacks[0] == [1] and board.subacks[1][0] >= 0x80, board.subacks   # other's cmd: refused
    board.publish("edgefleet/v1/dev/pi-1/events", b"mine")
    board.publish("edgefleet/v1/dev/pi-2/telemetry", b"forged")
    board.publish("edgefleet/v1/dev/pi-1/cmd", b"self-command")
    wait_for(lambda: watcher.seen(lambda t, p: p == b"mine"), 10, what="own-subtree publish")
    # the claim credential cannot act as a device either
    claimer = TlsProbe(fleet.broker, "claim")
    claimer.publish("edgefleet/v1/dev/pi-1/telemetry", b"claim-as-device")
    marker = TlsProbe(fleet.broker, "operator")
    marker.publish("edgefleet/v1/dev/pi-1/events", b"marker")
    wait_for(lambda: watcher.seen(lambda t, p: p == b"marker"), 10, what="marker")
    assert not watcher.seen(lambda t, p: p in (b"forged", b"self-command", b"claim-as-device"))
    for p in (watcher, board, claimer, marker):
        p.close()


def test_fifty_claims_in_one_command_and_bad_claims(fleet):
    b = fleet.broker
    answers = TlsProbe(b, "claim", ("edgefleet/v1/claim/answer/+",))
    sender = TlsProbe(b, "claim")
    nonces = {}
    for i in range(50):
        body = make_request(new_key(), f"batch-{i:02d}", hardware={"board": "rpi4"})
        nonces[body["nonce"]] = body["device_id"]
        sender.publish("edgefleet/v1/claim/req", json.dumps(body).encode())
    wait_for(lambda: sum(d.startswith("batch-") for d in pending_ids(fleet)) == 50, 30, what="50 pending claims")
    t0 = time.monotonic()
    r = fleet.ctl("devices", "accept", "--all", timeout=90)
    assert r.returncode == 0 and "accepted 50 of 50" in r.stdout, r.stdout + r.stderr
    oks = wait_for(
        lambda: [m for m in answers.seen() if json.loads(m[1]).get("ok") and json.loads(m[1])["nonce"] in nonces]
        if len([m for m in answers.seen() if json.loads(m[1]).get("ok") and json.loads(m[1])["nonce"] in nonces]) >= 50
        else None, 30, what="50 answers")
    assert len({json.loads(p)["nonce"] for _, p in oks}) == 50
    print(f"50 claims accepted and answered in {time.monotonic() - t0:.1f}s")

    def refused(body_or_bytes) -> dict:
        payload = body_or_bytes if isinstance(body_or_bytes, bytes) else json.dumps(body_or_bytes).encode()
        nonce = None if isinstance(body_or_bytes, bytes) else body_or_bytes["nonce"]
        sender.publish("edgefleet/v1/claim/req", payload)
        if nonce is None:
            return {}
        hits = wait_for(lambda: [json.loads(p) for t, p in answers.seen() if t.endswith(nonce)], 20,
                        what=f"answer to {nonce}")
        return hits[-1]

    forged = make_request(new_key(), "forge-1")
    forged["device_id"] = "forge-2"        # changed after signing
    assert refused(forged)["reason"] in ("bad_signature", "id_mismatch")
    other = make_request(new_key(), "swap-1")
    swapped = make_request(new_key(), "swap-1", nonce=os_nonce())
    swapped["csr"] = other["csr"]          # a CSR for a key that did not sign the claim
    assert refused(swapped)["reason"] == "bad_signature"
    assert refused(make_request(new_key(), "batch-00"))["reason"] == "exists"
    stale = make_request(new_key(), "late-1", ts=time.time() - 3600)
    assert refused(stale)["reason"] == "stale"
    refused(json.dumps(make_request(new_key(), "big-1", hardware={"pad": "x" * 20000})).encode())  # no answer
    again = make_request(new_key(), "auto-replay")     # auto-accepted by pattern
    sender.publish("edgefleet/v1/claim/req", json.dumps(again).encode())
    sender.publish("edgefleet/v1/claim/req", json.dumps(again).encode())     # replayed
    wait_for(lambda: Registry(fleet.db, readonly=True).rejects().get("claim_replayed", 0) >= 1, 20,
             what="replay counted")
    ans = wait_for(lambda: [json.loads(p) for t, p in answers.seen() if t.endswith(again["nonce"])], 20,
                   what="the original's answer")
    assert all(a["ok"] for a in ans), ans   # the replay never overwrote the original's answer
    rejects = Registry(fleet.db, readonly=True).rejects()
    for reason in ("claim_bad_signature", "claim_exists", "claim_stale", "claim_oversize", "claim_replayed"):
        assert rejects.get(reason, 0) >= 1, (reason, rejects)
    answers.close()
    sender.close()


def os_nonce() -> str:
    return os.urandom(16).hex()


def test_rotation_two_renewals_no_lost_telemetry(fleet):
    """20 s certificates renewed at 2/3 of their life, twice, while telemetry flows: every
    telemetry sequence number arrives."""
    proc = fleet.add_agent("auto-rot", interval=0.25)   # auto-accepted by the controller's pattern
    cert = fleet.tmp / "auto-rot" / "own.pem"
    wait_for(cert.exists, 30, what="auto-rot claimed")

    def renewals() -> int:
        reg = Registry(fleet.db, readonly=True)
        try:
            rows = reg.telemetry("auto-rot", limit=1)
            return rows[-1]["body"].get("cert", {}).get("renewals", 0) if rows else 0
        finally:
            reg.close()

    wait_for(lambda: renewals() >= 2, 60, interval=0.2, what="two renewals")
    assert proc.poll() is None
    reg = Registry(fleet.db, readonly=True)
    seqs = sorted(r["body"]["seq"] for r in reg.telemetry("auto-rot", limit=100000))
    last = reg.telemetry("auto-rot", limit=1)[-1]["body"]["cert"]
    reg.close()
    assert seqs == list(range(1, seqs[-1] + 1)), f"lost telemetry: {sorted(set(range(1, seqs[-1] + 1)) - set(seqs))}"
    assert last["failures"] == 0 and last["expires_in_s"] > 0, last
    assert not (fleet.tmp / "auto-rot" / "own.pem.prev").exists()
    r = fleet.ctl("devices")
    assert r.returncode == 0 and "auto-rot" in r.stdout, r.stdout + r.stderr
    assert "certificate expires in" in r.stderr   # 20 s certificates are always "soon"
    log = (fleet.tmp / "auto-rot.log").read_text()
    assert log.count("certificate renewed") >= 2, log[-3000:]


def list_clients(broker) -> list[str]:
    probe = TlsProbe(broker, "operator", ("$CONTROL/dynamic-security/v1/response",))
    try:
        probe.publish("$CONTROL/dynamic-security/v1", json.dumps(
            {"commands": [{"command": "listClients", "count": -1}]}).encode())
        hits = wait_for(lambda: [json.loads(p) for _, p in probe.seen()], 10, what="listClients")
        return hits[0]["responses"][0]["data"]["clients"]
    finally:
        probe.close()


def test_kill_between_issue_and_dynsec_then_revoke(fleet, tmp_path):
    """The controller dies after committing the certificate, before the broker call: a new
    controller on the same database completes it; a revoked device is removed from the broker
    and its renewal is refused."""
    import asyncio

    from controller.audit import AuditLog
    from controller.db import connect
    from controller.provisioning.dynsec import RESPONSE
    from controller.provisioning.engine import Provisioner
    from controller.provisioning.store import ClaimStore
    from protocol.mqttlink import MqttLink, TlsFiles, parse_broker_url
    from protocol.topics import Topics

    b = fleet.broker
    answers = TlsProbe(b, "claim", ("edgefleet/v1/claim/answer/+",))
    sent: list[tuple[str, str, dict]] = []

    async def main() -> None:
        cert, key = b.identity("controller")
        link = MqttLink("ctl-test", parse_broker_url(b.url), tls=TlsFiles(str(b.pki / "ca.pem"), str(cert), str(key)),
                        subscriptions=[(RESPONSE, 1)])
        await link.start()
        assert await link.wait_connected(10)

        def make() -> Provisioner:
            db = connect(tmp_path / "ctl.db")
            return Provisioner(ClaimStore(db), AuditLog(db), Topics(), link.publish,
                               lambda d, c, a: sent.append((d, c, a)) or True, ca_dir=str(b.pki), lifetime_s=600)

        p1 = make()
        body = make_request(new_key(), "killed-1")
        cid = p1.on_claim(json.dumps(body).encode())
        assert cid and p1.store.decide(cid, "accepted", "test")
        p1.issue_accepted()                    # committed ... and the controller is killed here
        p1.store.db.close()
        assert "killed-1" not in list_clients(b)
        p2 = make()                            # the restarted controller
        pump = asyncio.create_task(_pump(link, p2))
        assert p2.store.get(cid).status == "issued"
        await p2.step()
        assert p2.store.get(cid).status == "done"
        assert "killed-1" in list_clients(b)
        await until(lambda: [p for t, p in answers.seen() if t.endswith(body["nonce"]) and json.loads(p)["ok"]], 20,
                    what="the completed claim's answer")   # async: the link's I/O runs on this loop
        await p2.step()                        # idempotent: nothing more to do, nothing breaks
        p2.store.set_identity("killed-1", "revoking", None, None)
        await p2.step()
        assert "killed-1" not in list_clients(b)
        assert p2.store.identity("killed-1")[0] == "revoked"
        renewal = make_request(new_key(), "killed-1", "renew")
        assert not p2.on_renew("killed-1", json.dumps(renewal).encode())
        assert sent[-1][1] == "cert.refused" and sent[-1][2]["reason"] == "revoked"
        assert p2.on_claim(json.dumps(make_request(new_key(), "killed-1")).encode()) is None   # no re-claim
        pump.cancel()
        await link.stop()

    async def _pump(link, prov) -> None:
        while True:
            prov.handles(await link.messages.get())

    asyncio.run(main())
    answers.close()

    # and through the CLI, on a running board: revoked at once, its own certificate can no longer act
    fleet.add_agent("pi-rev")
    wait_for(lambda: "pi-rev" in pending_ids(fleet), 30, what="pi-rev's claim")
    assert fleet.ctl("devices", "accept", "pi-rev").returncode == 0
    wait_for(lambda: (d := device(fleet.db, "pi-rev")) is not None and d.online, 30, what="pi-rev online")
    r = fleet.ctl("devices", "revoke", "pi-rev")
    assert r.returncode == 0 and "revoked 1 device" in r.stdout, r.stdout + r.stderr
    assert "pi-rev" not in list_clients(b)
    watcher = TlsProbe(b, "operator", ("edgefleet/v1/dev/+/events",))
    board = TlsProbe(b, "pi-rev")
    board.publish("edgefleet/v1/dev/pi-rev/events", b"after-revoke")
    TlsProbe(b, "operator").publish("edgefleet/v1/dev/x/events", b"marker")
    wait_for(lambda: watcher.seen(lambda t, p: p == b"marker"), 10, what="marker")
    assert not watcher.seen(lambda t, p: p == b"after-revoke")
    out = json.loads(fleet.ctl("audit", "--json").stdout)["entries"]
    actions = {(e["action"], e["target"]) for e in out}
    assert ("device.accept", "pi-rev") in actions and ("device.revoke", "pi-rev") in actions, actions
    assert all(e["actor"] for e in out)
    watcher.close()
    board.close()
