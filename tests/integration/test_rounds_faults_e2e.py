"""Federated rounds under faults against a real Mosquitto and a real controller process (issue 15).

Item 1: Mosquitto stopped with SIGTERM mid-round (it publishes every client's last will) and
restarted on the same port with persistence: the round is not failed, the updates sent after the
outage count, the run reaches its rounds.
Item 2: the controller SIGKILLed at every step boundary of a round (``FAILPOINTS``), restarted:
the run still ends ``done`` with the right version, each device trained each round once.

The devices are small paho clients that behave as the agent does (persistent session, a retained
last will, dedupe tasks by (run, round), send the update again until ``fl.ack``) and whose
reconnects the test controls.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from controller.fl.runner import FAILPOINTS
from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.envelope import Envelope, decode, encode
from tests.helpers.broker import Mosquitto
from tests.helpers.fleet import ENV, ROOT, device, stop
from tests.helpers.learning import store, wait_run
from tests.helpers.waiting import Probe, wait_for
from tests.integration.test_federated_e2e import start_run

BASE = "edgefleet/v1"


class FakeDevice:
    """A device that answers every task with a small valid update, as the agent does."""

    def __init__(self, port: int, dev: str, hold: bool = False) -> None:
        self.dev, self.port = dev, port
        self.tasks: list[dict] = []
        self.acks: list[dict] = []
        self.unacked: dict[str, bytes] = {}
        self.seen: set[str] = set()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.may_reconnect = threading.Event()
        self.may_reconnect.set()
        self.disconnected = threading.Event()
        self.connected = threading.Event()
        self._stop = False
        self._lock = threading.Lock()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=dev, protocol=mqtt.MQTTv311, clean_session=False)
        c.will_set(f"{BASE}/dev/{dev}/state", self._state("offline"), 1, True)
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        self.c = c
        c.connect("127.0.0.1", port, keepalive=5)
        self.thread = threading.Thread(target=self._loop, name=f"fake-{dev}", daemon=True)
        self.thread.start()
        if not self.connected.wait(10):
            raise TimeoutError(f"{dev} could not connect")

    def _state(self, status: str) -> bytes:
        return encode(Envelope(kind="state", sender=self.dev, body={"status": status, "group": "default"}))

    def _loop(self) -> None:
        """Paho's network loop, with reconnects only when the test allows them."""
        last_resend = 0.0
        while not self._stop:
            rc = self.c.loop(0.1)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.connected.clear()
                self.disconnected.set()
                self.may_reconnect.wait()
                try:
                    self.c.reconnect()
                except OSError:
                    time.sleep(0.2)
                continue
            if time.monotonic() - last_resend > 1.0:     # the agent's re-send of un-acked updates
                last_resend = time.monotonic()
                self._flush()

    def _on_connect(self, client, userdata, flags, rc, props=None) -> None:
        client.subscribe(f"{BASE}/dev/{self.dev}/cmd", 1)
        client.subscribe(f"{BASE}/dev/{self.dev}/bin", 1)   # fl.task frames
        client.publish(f"{BASE}/dev/{self.dev}/state", self._state("online"), 1, True)
        tel = Envelope(kind="telemetry", sender=self.dev, body={"seq": int(time.time() * 1000), "interval_s": 1,
                                                                "cpu_percent": 1.0,
                                                                "learning": {"labelled_samples": 500}})
        client.publish(f"{BASE}/dev/{self.dev}/telemetry", encode(tel), 1)
        self.disconnected.clear()
        self.connected.set()

    def _on_message(self, client, userdata, m) -> None:
        if is_frame(m.payload):
            f = decode_frame(m.payload)
            if f.envelope.kind != "fl.task":
                return
            b = f.envelope.body
            key = f"{b['run_id']}#{b['round']}"
            with self._lock:
                self.tasks.append(dict(b))
                if key in self.seen:
                    return          # deduped by (run, round), as the agent does
                self.seen.add(key)
            threading.Thread(target=self._answer, args=(b, f.tensors), daemon=True).start()
        else:
            env = decode(m.payload)
            if env.kind == "fl.ack":
                with self._lock:
                    self.acks.append(dict(env.body))
                    self.unacked.pop(f"{env.body['run_id']}#{env.body['round']}", None)

    def _answer(self, b: dict, tensors: dict) -> None:
        self.release.wait()
        delta = {k: np.full_like(v, 0.01, dtype=np.float32) for k, v in tensors.items()}
        up = Envelope(kind="fl.update", sender=self.dev, body={
            "run_id": b["run_id"], "round": b["round"], "base_version": b["base_version"], "num_samples": 100,
            "encoding": "raw", "train_loss": 0.5})
        with self._lock:
            self.unacked[f"{b['run_id']}#{b['round']}"] = encode_frame(up, delta)
        self._flush()

    def _flush(self) -> None:
        with self._lock:
            pending = list(self.unacked.values())
        if self.connected.is_set():
            for payload in pending:
                self.c.publish(f"{BASE}/dev/{self.dev}/data/fl", payload, 1)

    def trained(self) -> list[str]:
        with self._lock:
            return sorted(self.seen)

    def close(self) -> None:
        self._stop = True
        self.may_reconnect.set()
        self.release.set()
        try:
            self.c.disconnect()
        except Exception:  # noqa: BLE001
            pass
        self.thread.join(5)


def start_controller(url: str, db, log, failpoint: str | None = None) -> subprocess.Popen:
    env = {**ENV, **({"EDGEFLEET_FAILPOINT": failpoint} if failpoint else {})}
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", url, "--db", str(db), "serve"],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def controller_online(port: int, timeout: float = 30) -> None:
    probe = Probe(port, subscribe=(f"{BASE}/ctl/state",), protocol="3.1.1")
    try:
        wait_for(lambda: (seen := probe.seen()) and b'"online"' in seen[-1][1], timeout=timeout,
                 what="controller online")
    finally:
        probe.close()


@contextlib.contextmanager
def restartable_fleet(tmp_path, prefix):
    """A persistent Mosquitto, a real controller and two fake devices that hold their updates."""
    broker = Mosquitto(tmp_path, persistence=True).start()
    db = tmp_path / "registry.db"
    procs: list[subprocess.Popen] = []
    devs: list[FakeDevice] = []
    try:
        procs.append(start_controller(broker.url, db, tmp_path / "controller.log"))
        controller_online(broker.port)
        devs = [FakeDevice(broker.port, f"{prefix}-{i}", hold=True) for i in range(2)]
        for d in devs:
            wait_for(lambda d=d: (x := device(db, d.dev)) and x.online and x.telemetry, what=f"{d.dev} online")
        yield broker, db, devs
    finally:
        for d in devs:
            d.close()
        for p in procs:
            stop(p)
        broker.stop()


def restart_broker(broker, devs):
    """systemctl restart mosquitto: SIGTERM publishes every client's last will; the devices stay away
    until the test lets them reconnect."""
    for d in devs:
        d.may_reconnect.clear()
    broker.stop()
    for d in devs:
        assert d.disconnected.wait(15)
    broker.start()
    controller_online(broker.port)


def test_a_broker_restart_mid_round_does_not_fail_the_round(tmp_path, example_bundle):
    with restartable_fleet(tmp_path, "fd") as (broker, db, devs):
        run_id = start_run(broker.url, db, example_bundle[0], "--clients", "2", "--min-clients", "2",
                           "--rounds", "2", "--deadline", "40s", "--steps", "5")
        wait_for(lambda: all(d.tasks for d in devs), timeout=30, what="round 1 tasks at both devices")
        t_task = time.time()
        restart_broker(broker, devs)
        # the controller, back first, hears the devices' last wills: they look offline
        wait_for(lambda: all(not device(db, d.dev).online for d in devs), timeout=20,
                 what="the devices marked offline by their last wills")
        assert store(db).round(run_id, 1).status == "running", store(db).round(run_id, 1).metrics
        for d in devs:                                        # the devices come back and answer
            d.may_reconnect.set()
            d.release.set()
        run = wait_run(db, run_id, timeout=120)
        r1 = store(db).round(run_id, 1)
        assert r1.status == "aggregated", r1.metrics
        assert r1.metrics["received"] == 2 and r1.metrics["closed"] == "all selected devices answered"
        assert r1.finished < t_task + 40                      # before its deadline, with both updates
        assert run.status == "done" and run.global_version == 2
        assert all(d.trained() == [f"{run_id}#1", f"{run_id}#2"] for d in devs)


def test_a_broker_restart_with_a_device_that_never_returns_waits_for_the_deadline(tmp_path, example_bundle):
    """The round closes at its deadline, not at the last will; the reason says what happened; a run
    that did not reach its rounds is not done and ``round start --wait`` says so in its exit code."""
    with restartable_fleet(tmp_path, "fw") as (broker, db, devs):
        cli = subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", broker.url, "--db", str(db),
                                "round", "start", "--bundle", str(example_bundle[0]), "--json", "--max-cpu", "100",
                                "--clients", "2", "--min-clients", "1", "--rounds", "1", "--deadline", "15s",
                                "--steps", "5", "--wait"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV, cwd=ROOT, text=True)
        wait_for(lambda: all(d.tasks for d in devs), timeout=30, what="round 1 tasks at both devices")
        run_id = devs[0].tasks[0]["run_id"]
        restart_broker(broker, devs)
        devs[0].may_reconnect.set()                           # fw-1 never comes back
        devs[0].release.set()
        wait_for(lambda: devs[0].acks, timeout=30, what="fw-0's update acknowledged")
        assert store(db).round(run_id, 1).status == "running"
        out, _ = cli.communicate(timeout=90)
        assert cli.returncode == 0, out
        r1 = json.loads(out)["rounds"][0]
        m = r1["metrics"]
        assert r1["status"] == "aggregated" and m["closed"] == "deadline" and m["dropped"] == ["fw-1"]
        assert r1["finished"] >= r1["deadline"]
        assert {f["device"]: f["reason"] for f in m["failures"]} == {
            "fw-1": "no update by the deadline (offline at the deadline)"}


def test_every_failpoint_is_in_the_kill_loop():
    assert len(set(FAILPOINTS)) == len(FAILPOINTS) >= 9
    src = (ROOT / "controller" / "fl" / "runner.py").read_text()
    assert all(src.count(f'failpoint("{fp}")') >= 1 for fp in FAILPOINTS)


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_controller_killed_at_every_step_boundary_still_finishes_the_run(tmp_path, mosquitto, example_bundle,
                                                                           failpoint):
    db = tmp_path / "registry.db"
    log = tmp_path / "controller.log"
    procs: list[subprocess.Popen] = []
    devs: list[FakeDevice] = []
    try:
        procs.append(start_controller(mosquitto.url, db, log, failpoint))
        controller_online(mosquitto.port)
        devs = [FakeDevice(mosquitto.port, f"fk-{i}") for i in range(2)]
        for d in devs:
            wait_for(lambda d=d: (x := device(db, d.dev)) and x.online and x.telemetry, what=f"{d.dev} online")
        run_id = start_run(mosquitto.url, db, example_bundle[0], "--clients", "2", "--min-clients", "2",
                           "--rounds", "2", "--deadline", "60s", "--steps", "5")
        assert procs[0].wait(60) == -9, f"the controller did not reach {failpoint}"
        procs.append(start_controller(mosquitto.url, db, log))
        run = wait_run(db, run_id, timeout=90)
        assert run.status == "done" and run.global_version == 2, (run.status, run.error, log.read_text()[-3000:])
        for r in (1, 2):
            rnd = store(db).round(run_id, r)
            assert rnd.status == "aggregated" and sorted(rnd.tasks_sent) == ["fk-0", "fk-1"]
            ups = store(db).updates(run_id, r)
            assert sorted(u.device_id for u in ups) == ["fk-0", "fk-1"] and all(u.accepted for u in ups)
        for d in devs:
            assert d.trained() == [f"{run_id}#1", f"{run_id}#2"]    # each round trained once
            wait_for(lambda d=d: {(a["round"], a["accepted"]) for a in d.acks} == {(1, True), (2, True)},
                     what=f"{d.dev}: both updates acknowledged")
    finally:
        for d in devs:
            d.close()
        for p in procs:
            stop(p)
