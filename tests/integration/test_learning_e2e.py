"""A real agent adapts its head to drifted data over a real Mosquitto, and keeps it across a restart."""
from __future__ import annotations

import asyncio
import json
import signal

import numpy as np

from controller.registry import Registry
from tests.helpers.fleet import agent_config, device, fleetctl, start_agent, start_fleet, stop
from tests.helpers.waiting import Probe, wait_for


def drift(x):
    return np.clip(x * 0.5 + 5, 0, 16).astype(np.float32)


def test_agent_learns_from_drifted_labelled_stream_and_persists(tmp_path, mosquitto, example_bundle):
    from controller.modeltools.example import digits_split

    xtr, ytr, xte, yte = digits_split(0)
    np.save(tmp_path / "x.npy", drift(xtr))
    np.save(tmp_path / "y.npy", ytr)
    np.save(tmp_path / "xte.npy", drift(xte))
    extra = (f'[model]\nbundle = "{example_bundle[0]}"\n'
             f'[inference]\nsource = "replay"\nreplay_x = "{tmp_path / "x.npy"}"\nreplay_y = "{tmp_path / "y.npy"}"\n'
             f'rate_hz = 400\nresults = "summary"\nresults_interval_s = 1.0\n'
             f'[learning]\nenabled = true\nevery_n = 150\nmax_steps = 800\ncpu_fraction = 0.5\n')
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/+/results",))
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        agent = add_agent("learn-1", extra=extra)
        events = lambda name: [e for e in Registry(db, readonly=True).events("learn-1") if e["event"] == name]  # noqa
        adopted = wait_for(lambda: events("learning.adopted"), timeout=40, what="an adopted head")
        assert adopted[0]["body"]["head_version"] == 1
        tel = wait_for(lambda: (d := device(db, "learn-1")) and (d.telemetry or {}).get("learning", {})
                       .get("head_version", 0) >= 1 and d.telemetry["learning"], what="learning telemetry")
        assert tel["holdout_accuracy"] >= 0.95 and tel["labelled"] >= 150 and tel["buffer"]["bytes"] <= 2 << 20
        # the stream's accuracy goes up once the adapted head serves
        acc = lambda: [json.loads(p)["body"]["accuracy"] for _, p, _ in probe.seen(lambda t, p: b'"summary"' in p)]
        wait_for(lambda: len(acc()) >= 4, timeout=20, what="summaries")
        first, later = acc()[0], max(acc()[-2:])
        assert first < 0.96 and later >= first + 0.02, (first, acc())

        # feedback: label an earlier unlabelled request later; an unknown id is refused
        reply = json.loads(fleetctl("--broker", mosquitto.url, "infer", "learn-1", "--npy",
                                    str(tmp_path / "xte.npy"), "--row", "0", "--json").stdout)
        assert reply["ok"]
        before = device(db, "learn-1").telemetry["learning"]["labelled"]
        ok = _feedback(mosquitto, reply["request_id"], int(yte[0]))
        assert ok["ok"] is True and ok["labelled"] >= before + 1
        bad = _feedback(mosquitto, "no-such-request", 1)
        assert bad["ok"] is False and "unknown_request" in bad["error"]

        # restart: the adapted head comes back from its checkpoint
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(5) == 0
        restarted = start_agent(agent_config(tmp_path, "learn-1", mosquitto.url, extra=extra.replace(
            "enabled = true", "enabled = false")), tmp_path / "learn-1b.log")
        procs.append(restarted)
        restored = wait_for(lambda: events("learning.restored"), timeout=20, what="restored head")
        assert restored[-1]["body"]["head_version"] >= 1
        # 20 requests over one MQTT client (as `fleetctl infer --npy --row i` sends each; one process
        # instead of twenty CLI start-ups)
        replies = asyncio.run(_infer_rows(mosquitto.url, np.load(tmp_path / "xte.npy")[:20]))
        assert all(r["ok"] for r in replies), replies
        right = sum(r["result"]["label"] == int(yte[i]) for i, r in enumerate(replies))
        assert right >= 19
    finally:
        probe.close()
        for p in procs:
            stop(p)


async def _infer_rows(url: str, rows) -> list[dict]:
    from controller.client import FleetClient
    from controller.config import parse_config

    async with FleetClient(parse_config({"mqtt": {"broker": url}})) as fc:
        return [await fc.infer_tensors("learn-1", {"x": np.ascontiguousarray(r, np.float32)}, timeout=30)
                for r in rows]


def _feedback(mosquitto, request_id: str, label: int) -> dict:
    out = fleetctl("--broker", mosquitto.url, "feedback", "learn-1", request_id, str(label), "--json")
    return json.loads(out.stdout)
