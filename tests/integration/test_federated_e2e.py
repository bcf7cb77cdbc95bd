"""Federated rounds with real agent processes over a real Mosquitto."""
from __future__ import annotations

import json

import numpy as np

from controller.registry import Registry
from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.envelope import Envelope, decode, encode
from tests.helpers.fleet import device, fleetctl, start_controller, start_fleet, stop
from tests.helpers.learning import agent_extra, ready, shards, store, wait_run
from tests.helpers.waiting import Probe, wait_for


def start_run(url, db, bundle, *args) -> str:
    # all agents share this machine's CPU here (on boards each has its own): do not skip "busy" ones
    out = fleetctl("--broker", url, "--db", str(db), "round", "start", "--bundle", str(bundle), "--no-wait", "--json",
                   "--max-cpu", "100", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)["run_id"]


def events(db, dev, name):
    return [e for e in Registry(db, readonly=True).events(dev) if e["event"] == name]


def test_sync_round_completes_on_quorum_when_a_device_dies_mid_round(tmp_path, mosquitto, example_bundle):
    bundle = example_bundle[0]
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        sh = shards(tmp_path, 3)
        agents = {f"fl-{i}": add_agent(f"fl-{i}", extra=agent_extra(bundle, *sh[i], cpu=0.01 if i == 2 else 0.5))
                  for i in range(3)}
        for dev in agents:
            ready(db, dev)
        run_id = start_run(mosquitto.url, db, bundle, "--clients", "3", "--min-clients", "2", "--rounds", "1",
                           "--deadline", "20s", "--steps", "60")
        wait_for(lambda: (r := store(db).round(run_id, 1)) and "fl-2" in r.tasks_sent, timeout=60, what="tasks sent")
        agents["fl-2"].kill()   # dies while training (it trains slowly)
        run = wait_run(db, run_id)
        assert run.status == "done" and run.global_version == 1
        r1 = store(db).round(run_id, 1)
        assert r1.status == "aggregated" and r1.metrics["received"] == 2 and r1.metrics["dropped"] == ["fl-2"]
        # a device that went silent is not an answer (issue 15): the round waited for its deadline
        assert r1.metrics["closed"] == "deadline" and r1.finished >= r1.deadline
        assert {f["device"]: f["reason"] for f in r1.metrics["failures"]} == {
            "fl-2": "no update by the deadline (offline at the deadline)"}
        for dev in ("fl-0", "fl-1"):
            wait_for(lambda: events(db, dev, "fl.head_applied"), what=f"{dev} applies the new global head")
            assert events(db, dev, "fl.update_accepted")
        hist = fleetctl("--db", str(db), "round", "history", "--json")
        assert json.loads(hist.stdout)["runs"][0]["rounds"][0]["status"] == "aggregated"
        assert r1.metrics["accuracy"] > 0.5   # the new global head, evaluated on the bundle's eval set
        rep = fleetctl("--db", str(db), "report", "rounds", "--json", "--png", str(tmp_path / "rounds.png"))
        assert json.loads(rep.stdout)["rounds"][0]["accuracy"] == r1.metrics["accuracy"]
        assert (tmp_path / "rounds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        for p in procs:
            stop(p)


class EvilDevice:
    """A registered device that answers every task with a poisoned (NaN) update."""

    def __init__(self, port: int, dev: str = "evil-1") -> None:
        self.dev = dev
        self.acks: list[dict] = []
        self.tasks: list[dict] = []
        self.p = Probe(port, subscribe=(f"edgefleet/v1/dev/{dev}/cmd", f"edgefleet/v1/dev/{dev}/bin"),
                       client_id=dev)
        st = Envelope(kind="state", sender=dev, body={"status": "online", "group": "default"})
        self.p.publish(f"edgefleet/v1/dev/{dev}/state", encode(st), retain=True)
        tel = Envelope(kind="telemetry", sender=dev, body={"seq": 1, "interval_s": 1, "cpu_percent": 1.0,
                                                           "learning": {"labelled_samples": 500}})
        self.p.publish(f"edgefleet/v1/dev/{dev}/telemetry", encode(tel))
        self.p.client.on_message = self.on_message

    def on_message(self, client, userdata, m):
        if is_frame(m.payload):
            f = decode_frame(m.payload)
            if f.envelope.kind == "fl.task":
                b = f.envelope.body
                self.tasks.append(dict(b))
                delta = {k: np.full_like(v, np.nan) for k, v in f.tensors.items()}
                up = Envelope(kind="fl.update", sender=self.dev, body={
                    "run_id": b["run_id"], "round": b["round"], "base_version": b["base_version"],
                    "num_samples": 500, "encoding": "raw"})
                client.publish(f"edgefleet/v1/dev/{self.dev}/data/fl", encode_frame(up, delta), 1)
        else:
            env = decode(m.payload)
            if env.kind == "fl.ack":
                self.acks.append(dict(env.body))


def test_poisoned_update_is_rejected_and_never_aggregated(tmp_path, mosquitto, example_bundle):
    bundle = example_bundle[0]
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    evil = None
    try:
        sh = shards(tmp_path, 2)
        for i in range(2):
            add_agent(f"ok-{i}", extra=agent_extra(bundle, *sh[i]))
        for i in range(2):
            ready(db, f"ok-{i}")
        evil = EvilDevice(mosquitto.port)
        wait_for(lambda: (d := device(db, "evil-1")) and d.online, what="evil device registered")
        run_id = start_run(mosquitto.url, db, bundle, "--clients", "3", "--min-clients", "2", "--rounds", "1",
                           "--deadline", "20s", "--steps", "30", "--compress", "topk=0.2", "--compress", "int8=true",
                           "--dp", "clip=1.0", "--dp", "noise=0.5", "--strategy", "fedprox",
                           "--strategy-param", "mu=0.1")
        run = wait_run(db, run_id)
        assert run.status == "done" and run.global_version == 1
        ups = {u.device_id: u for u in store(db).updates(run_id, 1)}
        # the honest devices sent compressed (top-k + int8 + zstd) updates; DP was accounted
        m = store(db).round(run_id, 1).metrics
        assert m["dp_epsilon"] > 0 and m["dp_delta"] == 1e-5
        raw = sum(v.nbytes for v in run.head.values())
        assert all(ups[d].meta["bytes"] < raw for d in ("ok-0", "ok-1"))
        assert not ups["evil-1"].accepted and "NaN" in ups["evil-1"].reason
        assert ups["ok-0"].accepted and ups["ok-1"].accepted
        assert all(np.isfinite(v).all() for v in run.head.values())
        wait_for(lambda: evil.acks, what="the rejection reported to the device")
        assert evil.acks[0]["accepted"] is False and "NaN" in evil.acks[0]["reason"]
        # the task the device received carries what the (DP-wrapped) strategy configured
        assert evil.tasks[0]["prox_mu"] == 0.1 and evil.tasks[0]["dp"] == {"clip": 1.0} and evil.tasks[0]["steps"] == 30
    finally:
        if evil:
            evil.p.close()
        for p in procs:
            stop(p)


def test_controller_killed_mid_round_resumes(tmp_path, mosquitto, example_bundle):
    bundle = example_bundle[0]
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        sh = shards(tmp_path, 2)
        for i in range(2):
            add_agent(f"rs-{i}", extra=agent_extra(bundle, *sh[i], cpu=0.02))
        for i in range(2):
            ready(db, f"rs-{i}")
        run_id = start_run(mosquitto.url, db, bundle, "--clients", "2", "--min-clients", "2", "--rounds", "2",
                           "--deadline", "40s", "--steps", "60")
        wait_for(lambda: (r := store(db).round(run_id, 1)) and len(r.tasks_sent) == 2, timeout=60, what="tasks sent")
        uploads = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/+/data/fl",)).wait_subscribed()
        controller = procs[0]
        controller.kill()
        controller.wait()
        # devices finish and upload while the controller is down; the broker queues it
        uploads.wait(n=2, timeout=40, what="both round-1 updates")
        uploads.close()
        procs[0] = start_controller(mosquitto.url, db, tmp_path / "controller2.log")
        run = wait_run(db, run_id, timeout=60)
        assert run.status == "done" and run.global_version == 2
        r1 = store(db).round(run_id, 1)
        assert r1.status == "aggregated" and sorted(r1.tasks_sent) == ["rs-0", "rs-1"]
        assert all(u.accepted for u in store(db).updates(run_id, 1))
        for i in range(2):  # no device was sent the same round's task twice
            assert not [e for e in events(db, f"rs-{i}", "fl.task_refused") if "already trained" in e["body"]["reason"]]
    finally:
        for p in procs:
            stop(p)


def test_async_run_applies_a_stale_update_with_its_weight(tmp_path, mosquitto, example_bundle):
    bundle = example_bundle[0]
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        sh = shards(tmp_path, 3)
        for i, cpu in enumerate((0.5, 0.5, 0.02)):
            add_agent(f"as-{i}", extra=agent_extra(bundle, *sh[i], cpu=cpu))
        for i in range(3):
            ready(db, f"as-{i}")
        run_id = start_run(mosquitto.url, db, bundle, "--async", "--clients", "3", "--buffer", "2", "--rounds", "6",
                           "--max-staleness", "3", "--deadline", "60s", "--steps", "40")
        run = wait_run(db, run_id, timeout=90)
        assert run.status == "done" and run.global_version == 6
        stale = [(r.round_no, u) for r in store(db).rounds(run_id) for u in store(db).updates(run_id, r.round_no)
                 if u.device_id == "as-2" and u.accepted and u.meta.get("staleness", 0) >= 1]
        allups = [(r.round_no, u.device_id, u.accepted, u.reason, u.meta.get("staleness"), u.base_version)
                  for r in store(db).rounds(run_id) for u in store(db).updates(run_id, r.round_no)]
        assert stale, f"the slow device's update should arrive stale and still be used: {allups}"
        rnd, u = stale[0]
        m = store(db).round(run_id, rnd).metrics
        assert u.meta["staleness"] in m["staleness"]
    finally:
        for p in procs:
            stop(p)
