"""The agent serving real models over a real Mosquitto: ONNX Runtime int8 and LiteRT."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tests.helpers.bundles import make_plain_bundle
from tests.helpers.fleet import device, fleetctl, start_fleet, stop
from tests.helpers.waiting import Probe, wait_for


MODELS = Path(__file__).resolve().parents[1] / "models"


def test_agent_serves_int8_onnx_and_litert_over_mqtt(tmp_path, mosquitto, example_bundle, digits_test):
    x, y = digits_test
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    tfl = make_plain_bundle(tmp_path / "tfl", MODELS / "digits_int8.tflite", name="digits-tflite")
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/+/results",))
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        add_agent("onnx-1", extra=f'[model]\nbundle = "{example_bundle[0]}"\n'
                                  f'[inference]\nsource = "replay"\nreplay_x = "{tmp_path / "x.npy"}"\n'
                                  f'replay_y = "{tmp_path / "y.npy"}"\nrate_hz = 200\n'
                                  f'results = "summary"\nresults_interval_s = 1.0\n')
        add_agent("tfl-1", extra=f'[model]\nbundle = "{tfl}"\n')
        d = wait_for(lambda: (v := device(db, "onnx-1")) and v.online and v.state.get("model") and v,
                     what="onnx-1 online with a model")
        assert d.state["model"]["name"] == "digits" and d.state["model"]["runtime"] == "onnxruntime"
        assert "onnxruntime" in d.state["capabilities"]["runtimes"] and "litert" in d.state["capabilities"]["runtimes"]

        # request/response on both runtimes; a bad request gets a clear error, the next one works
        for dev in ("onnx-1", "tfl-1"):
            wait_for(lambda: (v := device(db, dev)) and v.online, what=f"{dev} online")
            good = fleetctl("--broker", mosquitto.url, "infer", dev, "--npy", str(tmp_path / "x.npy"), "--row", "3",
                            "--json")
            assert good.returncode == 0, good.stdout + good.stderr
            r = json.loads(good.stdout)["result"]
            assert r["label"] == int(y[3]) and r["path"] == "local" and 0 < r["confidence"] <= 1
            bad = fleetctl("--broker", mosquitto.url, "infer", dev, "--x", "[1, 2, 3]", "--json")
            assert bad.returncode == 1 and "shape" in json.loads(bad.stdout)["error"]
            nan = fleetctl("--broker", mosquitto.url, "infer", dev, "--x", json.dumps([99.0] * 64), "--json")
            assert nan.returncode == 1 and "outside the model's range" in json.loads(nan.stdout)["error"]
            again = fleetctl("--broker", mosquitto.url, "infer", dev, "--npy", str(tmp_path / "x.npy"), "--row", "4",
                             "--json")
            assert again.returncode == 0 and json.loads(again.stdout)["result"]["label"] == int(y[4])

        # streaming replay → per-interval summaries with real accuracy
        summaries = lambda: [json.loads(p)["body"] for t, p, _ in probe.seen(lambda t, p: t.endswith("onnx-1/results"))]
        s = wait_for(lambda: [b for b in summaries() if b.get("labelled", 0) >= 50], timeout=20, what="summaries")
        assert s[-1]["type"] == "summary" and s[-1]["accuracy"] >= 0.95
        tel = wait_for(lambda: (v := device(db, "onnx-1")) and (v.telemetry or {}).get("model", {}).get("inferences", 0)
                       >= 50 and v.telemetry["model"], what="model telemetry")
        assert tel["latency_ms"]["p99_ms"] > 0 and tel["mean_confidence"] > 0.9
        assert tel["request_errors"] == 2
    finally:
        probe.close()
        for p in procs:
            stop(p)


def test_bad_bundle_is_refused_and_the_agent_keeps_running(tmp_path, mosquitto, example_bundle):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(example_bundle[0], bad)
    (bad / "head.npz").write_bytes(b"corrupt")
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        add_agent("bad-1", extra=f'[model]\nbundle = "{bad}"\n')
        wait_for(lambda: (v := device(db, "bad-1")) and v.online, what="bad-1 online without a model")
        out = fleetctl("--broker", mosquitto.url, "infer", "bad-1", "--x", json.dumps([0.0] * 64), "--json")
        assert out.returncode == 1 and "no model loaded" in json.loads(out.stdout)["error"]
        from controller.registry import Registry

        ev = wait_for(lambda: [e for e in Registry(db, readonly=True).events("bad-1") if e["event"] == "model.refused"],
                      what="model.refused event")
        assert "head.npz" in ev[0]["body"]["reason"]
        assert fleetctl("--broker", mosquitto.url, "cmd", "bad-1", "ping").returncode == 0
    finally:
        for p in procs:
            stop(p)
