"""Offload through the learned bottleneck with real agents, real workers and a real Mosquitto.

* codes go only to the worker whose decoder matches (workers advertise ``split+pair``);
* a code that reaches a worker with another encoder/decoder pair or another split anyway (a
  stale route) gets one refusal with its reason code (``decoder_mismatch``, ``split_mismatch``);
* with no matching worker left, the board answers locally and counts it;
* a bundle whose exit head does not load is served without that exit (logged, reported)."""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import numpy as np

from agent.serving.inference import InferenceEngine
from protocol.binary import encode_frame
from protocol.bundle import head_bytes, load_bundle, write_manifest
from protocol.envelope import Envelope, decode
from protocol.offload import worker_req_topic
from tests.helpers.bundles import cached_exit_bundles
from tests.helpers.fleet import ENV, ROOT, agent_config, start_agent, stop
from tests.helpers.waiting import Probe, wait_for


def worker(url, bundle, wid, log):
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", url, "offload-worker", "--bundle",
                             str(bundle), "--id", wid], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))


def broken_exit_head(src, dst):
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    (dst / "exit0.npz").write_bytes(head_bytes({"dense0.weight": np.zeros((5, 8), np.float32),
                                                 "dense0.bias": np.zeros(8, np.float32)}))
    write_manifest(dst, man)
    return dst


def test_codes_reach_only_the_matching_decoder_and_every_mismatch_is_answered_with_a_reason(tmp_path, mosquitto):
    from controller.client import FleetClient
    from controller.config import load_config

    built = cached_exit_bundles()
    with np.load(built["pair_a"] / "eval.npz") as z:
        x, y = z["x"][:40], z["y"][:40]
    broken = broken_exit_head(built["pair_a"], tmp_path / "broken")
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/offload/workers/+", "edgefleet/v1/dev/bn-1/#",
                                             "edgefleet/v1/dev/bn-2/#", "edgefleet/v1/dev/probe-1/reply/#"))
    off = '[offload]\nenabled = true\nthreshold = 1.0\nmode = "features"\ndeadline_ms = 4000\n'
    procs = [start_agent(agent_config(tmp_path, "bn-1", mosquitto.url, interval=0.5,
                                      extra=f'[model]\nbundle = "{built["pair_a"]}"\n{off}'), tmp_path / "bn-1.log"),
             start_agent(agent_config(tmp_path, "bn-2", mosquitto.url, interval=0.5,
                                      extra=f'[model]\nbundle = "{broken}"\n'), tmp_path / "bn-2.log")]
    workers = {wid: worker(mosquitto.url, built[b], wid, tmp_path / f"{wid}.log")
               for wid, b in (("w-a", "pair_a"), ("w-b", "pair_b"), ("w-s", "other_split"))}
    procs += list(workers.values())
    cfg = load_config(None, {"mqtt": {"broker": mosquitto.url}})

    async def ask(dev, rows):
        async with FleetClient(cfg) as fc:
            return [await fc.infer_tensors(dev, {"image": x[i]}, label=int(y[i]), timeout=20) for i in rows]

    try:
        for dev in ("bn-1", "bn-2"):
            probe.wait(lambda t, p, d=dev: t.endswith(f"{d}/state") and b'"model"' in p, timeout=60,
                       what=f"{dev} serving")
        for wid in workers:
            probe.wait(lambda t, p, w=wid: t.endswith(f"/workers/{w}") and b"accepts" in p, timeout=60,
                       what=f"{wid} up")

        # 1. every request is offloaded (threshold 1.0) and goes to the one matching decoder
        res = [r["result"] for r in asyncio.run(ask("bn-1", range(8)))]
        assert [r["path"] for r in res] == ["remote"] * 8 and {r["worker"] for r in res} == {"w-a"}
        assert sum(r["label"] == int(y[i]) for i, r in enumerate(res)) >= 7

        # 2. the same code, as the board builds it, delivered to the other workers' own topics
        e = InferenceEngine(load_bundle(built["pair_a"]))
        e.exits.stop_at_cut = lambda: True
        pred = next(p for xi in x if (p := e.predict(xi)).resume is not None)
        code, extra, compress = e.exits.offload_tensor(pred)
        for i, wid in enumerate(("w-b", "w-s")):
            env = Envelope(kind="offload.request", sender="probe-1", corr=f"c{i}",
                           reply_to="edgefleet/v1/dev/probe-1/reply/offload",
                           body={"mode": "features", "deadline_ts": 4e9, "budget_ms": 5000.0, "model": "shapes",
                                 **extra})
            probe.publish(worker_req_topic("edgefleet/v1", wid), encode_frame(env, {"x": code}, compress=compress))
        replies = probe.wait(lambda t, p: t.endswith("probe-1/reply/offload"), n=2, timeout=30, what="refusals")
        got = {decode(p).body["worker"]: decode(p).body for _, p, _ in replies}
        assert got["w-b"]["ok"] is False and got["w-b"]["code"] == "decoder_mismatch"
        assert got["w-s"]["ok"] is False and got["w-s"]["code"] == "split_mismatch"

        # 3. the matching worker goes away: answered locally (finished past the cut), counted
        stop(workers["w-a"])
        probe.wait(lambda t, p: t.endswith("/workers/w-a") and not p, timeout=30, what="w-a status cleared")

        def local_now():
            r = asyncio.run(ask("bn-1", [8]))[0]["result"]
            return r if r["path"] == "local" else None

        r = wait_for(local_now, timeout=30, what="a local answer with no matching worker")
        want = InferenceEngine(load_bundle(built["pair_a"])).predict(x[8])   # the board's own full answer
        assert r["low_confidence"] and "split" in r["offload_skipped"] and r["label"] == want.label
        assert len(probe.seen(lambda t, p: t.endswith("probe-1/reply/offload"))) == 2   # one reply each, no more

        def tel(dev, key):
            def f(t, p):
                return t.endswith(f"{dev}/telemetry") and key(decode(p).body)
            return decode(probe.wait(f, timeout=30, what=f"{dev} telemetry")[-1][1]).body

        o = tel("bn-1", lambda b: (b.get("offload") or {}).get("no_worker_fits", 0) >= 1)["offload"]
        assert o["remote_ok"] == 8 and o["duplicate_replies"] == 0 and o["late_replies"] == 0
        assert "stopped_for_offload" in json.dumps(tel("bn-1", lambda b: "early_exits" in json.dumps(b)))

        # 4. the bundle whose first exit head does not load serves without it
        res2 = [r for r in asyncio.run(ask("bn-2", range(6)))]
        assert all(r["ok"] for r in res2) and sum(r["result"]["label"] == int(y[i]) for i, r in enumerate(res2)) >= 5
        b2 = tel("bn-2", lambda b: '"disabled": {"block2"' in json.dumps(b))
        assert "takes 5 features" in json.dumps(b2)
        assert "exit 0 (block2) disabled" in (tmp_path / "bn-2.log").read_text()
    finally:
        probe.close()
        for p in procs:
            stop(p)
