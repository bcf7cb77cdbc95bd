"""Offload through the learned bottleneck with a real agent, real workers and a real Mosquitto:
a matching worker answers; a worker with another encoder/decoder pair and one with another split
refuse with their reason code; the board answers each of those locally, counts it, and every
request gets exactly one reply."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np

from protocol.envelope import decode
from tests.helpers.bundles import cached_exit_bundles
from tests.helpers.fleet import ENV, ROOT, agent_config, start_agent, stop
from tests.helpers.waiting import Probe


def worker(url, bundle, wid, log):
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", url, "offload-worker", "--bundle",
                             str(bundle), "--id", wid], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))


def test_codes_go_to_the_matching_worker_and_mismatches_are_answered_locally_with_a_reason(tmp_path, mosquitto):
    from controller.client import FleetClient
    from controller.config import load_config

    built = cached_exit_bundles()
    with np.load(built["pair_a"] / "eval.npz") as z:
        x, y = z["x"][:60], z["y"][:60]
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/offload/workers/+", "edgefleet/v1/dev/bn-1/#"))
    procs = [start_agent(agent_config(tmp_path, "bn-1", mosquitto.url, interval=0.5,
                                      extra=f'[model]\nbundle = "{built["pair_a"]}"\n[offload]\nenabled = true\n'
                                            f'threshold = 1.0\nmode = "features"\ndeadline_ms = 4000\n'),
                         tmp_path / "bn-1.log")]
    try:
        procs += [worker(mosquitto.url, built[b], wid, tmp_path / f"{wid}.log")
                  for wid, b in (("w-a", "pair_a"), ("w-b", "pair_b"), ("w-s", "other_split"))]
        probe.wait(lambda t, p: t.endswith("bn-1/state") and b'"model"' in p, timeout=60, what="bn-1 serving")
        for wid in ("w-a", "w-b", "w-s"):
            probe.wait(lambda t, p, w=wid: t.endswith(f"/workers/{w}") and bool(p), timeout=60, what=f"{wid} up")

        async def ask():
            cfg = load_config(None, {"mqtt": {"broker": mosquitto.url}})
            out = []
            async with FleetClient(cfg) as fc:
                for i in range(len(x)):
                    out.append(await fc.infer_tensors("bn-1", {"image": x[i]}, label=int(y[i]), timeout=20))
                    kinds = {(r["result"]["path"], r["result"].get("offload_reason")) for r in out}
                    if {("remote", None), ("local_fallback", "decoder_mismatch"),
                            ("local_fallback", "split_mismatch")} <= kinds and len(out) >= 9:
                        break
            return out

        replies = asyncio.run(ask())
        assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]]
        res = [r["result"] for r in replies]
        remote = [r for r in res if r["path"] == "remote"]
        fallback = [r for r in res if r["path"] == "local_fallback"]
        assert len(remote) + len(fallback) == len(res)
        assert remote and {r["worker"] for r in remote} == {"w-a"}
        reasons = {r["offload_reason"] for r in fallback}
        assert reasons == {"decoder_mismatch", "split_mismatch"}, [(r.get("offload_reason"), r.get("offload_error"))
                                                                   for r in fallback]
        # answered locally: the full model's answer (the request was finished past the cut)
        assert sum(r["label"] == int(y[i]) for i, r in enumerate(res)) >= 0.85 * len(res)
        n_dec = sum(r["offload_reason"] == "decoder_mismatch" for r in fallback)
        n_split = len(fallback) - n_dec

        def offload_tel(t, p):
            if not t.endswith("bn-1/telemetry"):
                return False
            o = decode(p).body.get("offload") or {}
            return o.get("requests", 0) >= len(res) and sum((o.get("refusals") or {}).values()) >= len(fallback)

        tel = decode(probe.wait(offload_tel, timeout=30, what="offload telemetry")[-1][1]).body
        o = tel["offload"]
        assert o["refusals"] == {"decoder_mismatch": n_dec, "split_mismatch": n_split}
        assert o["remote_ok"] == len(remote) and o["duplicate_replies"] == 0 and o["unknown_replies"] == 0
        ex = json.dumps(tel)
        assert "early_exits" in ex and "stopped_for_offload" in ex
    finally:
        probe.close()
        for p in procs:
            stop(p)
