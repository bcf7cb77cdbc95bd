"""Controller replicas (issue 14 item 4) against a real Mosquitto 2 and real `fleetctl serve` processes.

Two replicas share one registry file (SQLite, two processes: WAL and its file lock; PostgreSQL is the
production registry) and one fleet through MQTT 5 shared subscriptions. What is checked:

* telemetry is split between the replicas (each takes some), every message is stored once;
* a replica refuses to run when it cannot share (mqtt.protocol 3.1.1), with a reason;
* a replica SIGKILLed at the step boundaries of a round (the FAILPOINTS of controller/fl/runner.py:
  a task acknowledged by the broker but not marked sent, an update recorded but not acknowledged) is taken over by
  the other within seconds: the run ends done, each device trained each round once, the run's lease
  changed owner once, and only the dead replica's in-flight step is repeated (a task the broker had
  acknowledged but the store not yet marked is sent once more; the device dedupes it by run and round,
  as after a single controller's restart). The full loop over every failpoint runs for a single
  controller in test_rounds_faults_e2e.py; the resume code is the same.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from protocol.envelope import Envelope, encode
from tests.helpers.broker import free_port
from tests.helpers.fleet import ENV, ROOT, device, stop
from tests.helpers.learning import store, wait_run
from tests.helpers.waiting import wait_for
from tests.integration.test_federated_e2e import start_run
from tests.integration.test_rounds_faults_e2e import FakeDevice

TTL = 3.0


def start_replica(tmp_path, url, db, name, failpoint=None, metrics_port=None, protocol="auto"):
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(f'[controller]\nreplica = "{name}"\nlease_ttl_s = {TTL}\n[mqtt]\nbroker = "{url}"\n'
                   f'protocol = "{protocol}"\n[registry]\npath = "{db}"\n')
    env = {**ENV, **({"EDGEFLEET_FAILPOINT": failpoint} if failpoint else {})}
    args = [sys.executable, "-m", "controller.cli", "--config", str(cfg), "serve"]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port)]
    log = tmp_path / f"{name}.log"
    return subprocess.Popen(args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT), log


def replica_online(port, name, timeout=30):
    seen = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = lambda cl, u, m: seen.append(m.payload)
    c.connect("127.0.0.1", port)
    c.subscribe(f"edgefleet/v1/ctl/state/{name}", 1)
    c.loop_start()
    try:
        wait_for(lambda: seen and b'"online"' in seen[-1], timeout=timeout, what=f"replica {name} online")
    finally:
        c.loop_stop()
        c.disconnect()
    time.sleep(0.3)  # its SUBACKs follow the online state


def lease(db, name):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return con.execute("SELECT owner, epoch FROM leases WHERE name=?", (name,)).fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        con.close()


def scrape(port, name):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_two_replicas_share_telemetry_and_store_each_message_once(tmp_path, mosquitto):
    db = tmp_path / "registry.db"
    ports = [free_port(), free_port()]
    procs = [start_replica(tmp_path, mosquitto.url, db, f"r{i + 1}", metrics_port=ports[i])[0] for i in range(2)]
    try:
        for i in range(2):
            replica_online(mosquitto.port, f"r{i + 1}")
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        pub.connect("127.0.0.1", mosquitto.port)
        pub.loop_start()
        n = 200
        infos = [pub.publish(f"edgefleet/v1/dev/sh-{i % 20}/telemetry",
                             encode(Envelope(kind="telemetry", sender=f"sh-{i % 20}", body={"seq": i, "interval_s": 10.0})), 1)
                 for i in range(n)]
        for info in infos:
            info.wait_for_publish(10)
        pub.loop_stop()
        pub.disconnect()

        def counts():
            return [scrape(p, 'edgefleet_messages_total{kind="telemetry"}') for p in ports]
        wait_for(lambda: sum(counts()) >= n, timeout=30, what="every message taken by one replica")
        per = counts()
        assert sum(per) == n and all(c > 0 for c in per), per      # split, not copied
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
        wait_for(lambda: con.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0] == n, timeout=20,
                 what="all stored once")
        con.close()
    finally:
        for p in procs:
            stop(p)


def test_a_replica_refuses_to_run_where_it_cannot_share(tmp_path):
    import asyncio

    from controller.config import parse_config
    from controller.service import ControllerService, ReplicaRefused

    cfg = parse_config({"controller": {"replica": "r1"}, "mqtt": {"protocol": "3.1.1"},
                        "registry": {"path": str(tmp_path / "r.db")}})
    svc = ControllerService(cfg)
    with pytest.raises(ReplicaRefused, match="MQTT 5 shared subscriptions"):
        asyncio.run(svc.run(asyncio.Event()))
    assert [f for f, _ in svc.subscriptions() if f.startswith("$share/")] == [
        "$share/edgefleet-ctl/edgefleet/v1/dev/+/telemetry", "$share/edgefleet-ctl/edgefleet/v1/dev/+/results"]


#: one kill per side of the hand-over: a task the broker acknowledged but the store had not marked
#: (the new owner sends it once more), and an update recorded whose fl.ack was never published
KILL_AT = ("fl.task.acked", "fl.update.recorded")


@pytest.mark.parametrize("failpoint", KILL_AT)
def test_a_replica_killed_mid_round_is_taken_over(tmp_path, mosquitto, example_bundle, failpoint):
    db = tmp_path / "registry.db"
    procs: list[subprocess.Popen] = []
    devs: list[FakeDevice] = []
    try:
        a, log_a = start_replica(tmp_path, mosquitto.url, db, "r1", failpoint=failpoint)
        procs.append(a)
        replica_online(mosquitto.port, "r1")
        devs = [FakeDevice(mosquitto.port, f"rk-{i}") for i in range(2)]
        for d in devs:
            wait_for(lambda d=d: (x := device(db, d.dev)) and x.online and x.telemetry, timeout=30,
                     what=f"{d.dev} online")
        run_id = start_run(mosquitto.url, db, example_bundle[0], "--clients", "2", "--min-clients", "2",
                           "--rounds", "1", "--deadline", "60s", "--steps", "5")
        wait_for(lambda: lease(db, f"fl:{run_id}"), timeout=30, what="the run's lease taken")
        assert lease(db, f"fl:{run_id}")[0] == "controller-r1"
        b, log_b = start_replica(tmp_path, mosquitto.url, db, "r2")
        procs.append(b)
        assert a.wait(60) == -9, f"replica r1 did not reach {failpoint}: {log_a.read_text()[-2000:]}"
        wait_for(lambda: (x := lease(db, f"fl:{run_id}")) and x[0] == "controller-r2", timeout=TTL + 60,
                 what="the run taken over by r2")   # TTL + r2's start-up and a tick (generous: a loaded machine)
        run = wait_run(db, run_id, timeout=90)
        assert run.status == "done" and run.global_version == 1, (run.status, run.error, log_b.read_text()[-3000:])
        assert lease(db, f"fl:{run_id}") == ("controller-r2", 2)      # one change of owner
        for r in (1,):
            rnd = store(db).round(run_id, r)
            assert rnd.status == "aggregated" and sorted(rnd.tasks_sent) == ["rk-0", "rk-1"]
            ups = store(db).updates(run_id, r)
            assert sorted(u.device_id for u in ups) == ["rk-0", "rk-1"] and all(u.accepted for u in ups)
        for d in devs:
            assert d.trained() == [f"{run_id}#1"]     # trained once
            per_round = [sum(1 for t in d.tasks if t["round"] == r) for r in (1,)]
            # at most the one task in flight at the kill is repeated: one whose broker ack had come but
            # whose "sent" mark was not yet committed. That window is not only fl.task.acked: on a slow
            # machine one device's update can be recorded (the kill) before the other's mark commits.
            # The device drops the repeat (it trained once, above); ruling the repeat out entirely
            # needs a store write before each publish (issue 14, open).
            assert all(c <= 2 for c in per_round), (failpoint, per_round)
            wait_for(lambda d=d: {(a_["round"], a_["accepted"]) for a_ in d.acks} == {(1, True)},
                     timeout=30, what=f"{d.dev}: its update acknowledged")
        assert "taken by controller-r2" in log_b.read_text()
    finally:
        for d in devs:
            d.close()
        for p in procs:
            stop(p)
