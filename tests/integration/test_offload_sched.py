"""Deadline scheduling across offload workers, against a real Mosquitto with real agents and workers.

Workers run in this process (a thread with its own event loop and its own MQTT link) when a test
must slow one down mid-run, and as a ``fleetctl offload-worker`` process when it must be killed.
Every request the test makes gets exactly one answer, within its deadline, whatever the workers do.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from controller.config import load_config
from controller.offload.worker import OffloadWorker, WorkerOptions
from protocol.binary import encode_frame
from protocol.envelope import Envelope, decode
from tests.helpers.broker import Mosquitto
from tests.helpers.bundles import example_into
from tests.helpers.fleet import ENV, ROOT, agent_config, start_agent, stop
from tests.helpers.waiting import Probe, wait_for

BASE = "edgefleet/v1"
DEADLINE_MS = 1500


def declare(bundle, accepts):
    """Declare what the bundle's worker accepts (manifest ``offload.accepts``)."""
    mp = bundle / "manifest.json"
    m = json.loads(mp.read_text())
    m["offload"] = {"accepts": accepts}
    mp.write_text(json.dumps(m))
    return bundle


class InProcessWorker:
    def __init__(self, url, bundle, wid, **opts):
        self.w = OffloadWorker(load_config(None, {"mqtt": {"broker": url}}), bundle, wid,
                               options=WorkerOptions(**opts))
        self.loop = asyncio.new_event_loop()
        self.stop_ev = None
        up = threading.Event()

        async def main():
            self.stop_ev = asyncio.Event()
            await self.w.run(self.stop_ev, up.set)

        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(main()), daemon=True)
        self.thread.start()
        assert up.wait(30), "worker did not connect"

    def set(self, **kw):
        for k, v in kw.items():
            self.loop.call_soon_threadsafe(setattr, self.w, k, v)

    def close(self):
        if self.stop_ev is not None:
            self.loop.call_soon_threadsafe(self.stop_ev.set)
        self.thread.join(15)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, example_bundle, large_bundle):
    tmp = tmp_path_factory.mktemp("sched")
    broker = Mosquitto(tmp).start()
    head = declare(shutil.copytree(large_bundle, tmp / "head"), ["features"])
    cascade, _ = example_into(tmp / "cascade", size="large", seed=1, epochs=30)
    declare(cascade, ["raw"])
    agents = {}
    for dev, mode in (("sf", "features"), ("sr", "raw")):
        agents[dev] = start_agent(agent_config(tmp, dev, broker.url, extra=(
            f'[model]\nbundle = "{example_bundle[0]}"\n[offload]\nenabled = true\nthreshold = 1.0\n'
            f'mode = "{mode}"\ndeadline_ms = {DEADLINE_MS}\n')), tmp / f"{dev}.log")
    probe = Probe(broker.port, subscribe=(f"{BASE}/dev/+/reply/#", f"{BASE}/dev/+/telemetry",
                                          f"{BASE}/offload/workers/+"))
    wait_for(lambda: {t.split("/")[3] for t, p, _ in probe.seen(lambda t, p: t.endswith("/telemetry"))}
             >= {"sf", "sr"}, timeout=60, what="both agents up")
    yield {"broker": broker, "tmp": tmp, "head": head, "cascade": cascade, "large": large_bundle, "probe": probe}
    probe.close()
    for p in agents.values():
        stop(p)
    broker.stop()


def infer_many(url, dev, xs, concurrent=False):
    """Results of ``infer`` for each row, and how long each took (s)."""
    from controller.client import FleetClient

    async def go():
        async with FleetClient(load_config(None, {"mqtt": {"broker": url}})) as fc:
            async def one(x):
                t0 = time.monotonic()
                r = await fc.infer(dev, x.tolist(), timeout=30)
                return r, time.monotonic() - t0
            if concurrent:
                return await asyncio.gather(*(one(x) for x in xs))
            return [await one(x) for x in xs]

    out = asyncio.run(go())
    for r, _ in out:
        assert r.get("ok"), r
    return [(r["result"], dt) for r, dt in out]


def telemetry(probe, dev, pred, what):
    def latest():
        msgs = probe.seen(lambda t, p: t == f"{BASE}/dev/{dev}/telemetry" and p)
        for t, p, _ in reversed(msgs):
            o = (decode(p).body.get("offload") or {})
            if o and pred(o):
                return o
        return None
    return wait_for(latest, timeout=30, what=what)


def workers_seen(probe, ids, pred=lambda b: True):
    def ok():
        last = {}
        for t, p, _ in probe.seen(lambda t, p: t.startswith(f"{BASE}/offload/workers/")):
            last[t.rsplit("/", 1)[1]] = decode(p).body if p else None
        return all(last.get(i) is not None and pred(last[i]) for i in ids)
    wait_for(ok, timeout=30, what=f"workers {ids}")


def one_answer_each(probe, dev):
    corrs = Counter(decode(p).corr for t, p, _ in probe.seen(
        lambda t, p: t.startswith(f"{BASE}/dev/{dev}/reply/") and not t.endswith("/offload")))
    assert corrs and max(corrs.values()) == 1, corrs.most_common(3)


def test_features_go_to_the_split_worker_and_raw_to_the_cascade_worker(fleet, digits_test):
    x, _ = digits_test
    url = fleet["broker"].url
    ws = [InProcessWorker(url, fleet["head"], "head-w"), InProcessWorker(url, fleet["cascade"], "cascade-w")]
    try:
        workers_seen(fleet["probe"], ["head-w", "cascade-w"])
        feats = infer_many(url, "sf", x[:4])
        raw = infer_many(url, "sr", x[:4])
        assert [r["path"] for r, _ in feats] == ["remote"] * 4, [(r.get("offload_error"), r.get("offload_code")) for r, _ in feats]
        assert {r["worker"] for r, _ in feats} == {"head-w"}
        assert [r["path"] for r, _ in raw] == ["remote"] * 4 and {r["worker"] for r, _ in raw} == {"cascade-w"}
        st = {w.w.id: w.w.status() for w in ws}
        assert st["head-w"]["accepts"]["raw"] is False and st["head-w"]["accepts"]["splits"]
        assert st["cascade-w"]["accepts"] == {"raw": True, "splits": [], "input_shape": [None, 64]}
        o = telemetry(fleet["probe"], "sf", lambda o: o.get("routed", 0) >= 4, "routed requests counted")
        assert o["workers"]["head-w"]["ok"] >= 4 and o["answered_remote"] >= 4
    finally:
        for w in ws:
            w.close()


def test_a_worker_slowed_5x_is_avoided_and_a_late_answer_is_counted_once(fleet, digits_test):
    x, _ = digits_test
    url = fleet["broker"].url
    ws = [InProcessWorker(url, fleet["large"], f"s{i}", emulate_service_ms=60) for i in range(2)]
    try:
        workers_seen(fleet["probe"], ["s0", "s1"])
        first = infer_many(url, "sf", x[:6])
        assert all(r["path"] == "remote" for r, _ in first)
        busy = Counter(r["worker"] for r, _ in first).most_common(1)[0][0]
        other = "s1" if busy == "s0" else "s0"
        ws[int(busy[1])].set(slowdown=5.0)
        after = infer_many(url, "sf", x[6:14])
        assert all(r["path"] == "remote" for r, _ in after)
        assert [r["worker"] for r, _ in after[-5:]] == [other] * 5, [r["worker"] for r, _ in after]

        # both now take 2.4 s (40x) but their estimates say 60-300 ms: the next request is taken,
        # the board answers locally at its deadline, and the late answer is counted and dropped
        for w in ws:
            w.set(slowdown=40.0)
        (r, dt), = infer_many(url, "sf", x[14:15])
        assert r["path"] == "local_fallback" and dt < DEADLINE_MS / 1000 + 3.0
        o = telemetry(fleet["probe"], "sf", lambda o: o.get("late_replies", 0) >= 1, "the late reply counted")
        assert o["timeouts"] >= 1 and o["local_after_remote"] >= 1
        one_answer_each(fleet["probe"], "sf")
    finally:
        for w in ws:
            w.close()


def test_a_hopeless_request_is_refused_at_once_with_the_reason(fleet, digits_test):
    """Three requests at once on a worker that takes 600 ms each, 1.5 s budget: the third is told now."""
    x, _ = digits_test
    url = fleet["broker"].url
    w = InProcessWorker(url, fleet["large"], "d0", emulate_service_ms=600)
    probe = Probe(fleet["broker"].port, subscribe=(f"{BASE}/dev/tester/reply/offload",))
    try:
        workers_seen(fleet["probe"], ["d0"])
        t0 = time.monotonic()
        for i in range(3):
            env = Envelope(kind="offload.request", sender="tester", corr=f"c{i}",
                           reply_to=f"{BASE}/dev/tester/reply/offload",
                           body={"mode": "raw", "deadline_ts": time.time() + 1.5, "budget_ms": 1500.0,
                                 "model": "digits"})
            probe.client.publish(f"{BASE}/offload/req/d0", encode_frame(env, {"x": x[i]}), 1)
        msgs = probe.wait(lambda t, p: decode(p).corr == "c2", what="the refusal")
        dt = time.monotonic() - t0
        body = decode(msgs[0][1]).body
        assert body["ok"] is False and body["code"] == "deadline" and body["worker"] == "d0"
        assert dt < 1.2, "refused before the first two were served"
        done = probe.wait(n=3, timeout=30, what="the two served")
        assert sorted(decode(p).corr for t, p, _ in done) == ["c0", "c1", "c2"]
        assert [decode(p).body["ok"] for t, p, _ in done if decode(p).corr != "c2"] == [True, True]
        assert w.w.dropped["deadline"] == 1
    finally:
        probe.close()
        w.close()


def test_a_worker_killed_mid_request_the_board_answers_locally_in_time(fleet, digits_test):
    x, _ = digits_test
    url = fleet["broker"].url
    log = open(fleet["tmp"] / "kw.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", url, "offload-worker", "--bundle",
                          str(fleet["large"]), "--id", "kw", "--emulate-service-ms", "900", "--status-interval",
                          "0.2"], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        workers_seen(fleet["probe"], ["kw"])
        out = {}
        th = threading.Thread(target=lambda: out.update(r=infer_many(url, "sf", x[20:21])))
        th.start()
        workers_seen(fleet["probe"], ["kw"], lambda b: b.get("queue_len", 0) >= 1)   # it is serving ours
        p.kill()
        p.wait()
        th.join(30)
        (r, dt), = out["r"]
        assert r["path"] == "local_fallback" and dt < DEADLINE_MS / 1000 + 3.0
        # the broker publishes the dead worker's will: its status is cleared, boards stop routing to it
        fleet["probe"].wait(lambda t, p: t.endswith("/offload/workers/kw") and not p, what="kw's status cleared")
        one_answer_each(fleet["probe"], "sf")
    finally:
        stop(p)


def test_an_idle_worker_steals_queued_work_from_a_busy_peer(fleet, digits_test):
    """Six requests routed to one worker (300 ms each, 5 s budget): its idle peer takes some over,
    and every request is answered exactly once, by one of them."""
    x, _ = digits_test
    url = fleet["broker"].url
    ws = [InProcessWorker(url, fleet["large"], f"t{i}", emulate_service_ms=300) for i in range(2)]
    probe = Probe(fleet["broker"].port, subscribe=(f"{BASE}/dev/tester/reply/steal",))
    try:
        workers_seen(fleet["probe"], ["t0", "t1"])
        for i in range(6):
            env = Envelope(kind="offload.request", sender="tester", corr=f"s{i}",
                           reply_to=f"{BASE}/dev/tester/reply/steal",
                           body={"mode": "raw", "deadline_ts": time.time() + 5, "budget_ms": 5000.0, "model": "digits"})
            probe.client.publish(f"{BASE}/offload/req/t0", encode_frame(env, {"x": x[i]}), 1)
        done = probe.wait(n=6, timeout=30, what="six answers")
        bodies = {decode(p).corr: decode(p).body for t, p, _ in done}
        assert sorted(bodies) == [f"s{i}" for i in range(6)] and all(b["ok"] for b in bodies.values())
        thief = [b for b in bodies.values() if b["worker"] == "t1"]
        assert thief and all(b["stolen_from"] == "t0" for b in thief)
        assert ws[0].w.stolen["given"] == len(thief) == ws[1].w.stolen["taken"]
        time.sleep(0.5)                                   # nothing answered twice
        assert len(probe.seen()) == 6
    finally:
        probe.close()
        for w in ws:
            w.close()
