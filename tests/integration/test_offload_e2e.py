"""Offload with real agent and worker processes over a real Mosquitto (MQTT 5 shared subscription)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np

from tests.helpers.fleet import ENV, ROOT, device, fleetctl, start_fleet, stop
from tests.helpers.waiting import Probe, wait_for


def worker(url, bundle, wid, log):
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", url, "offload-worker", "--bundle",
                             str(bundle), "--id", wid], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=open(log, "wb"))


def infer(url, dev, npy, row):
    out = fleetctl("--broker", url, "infer", dev, "--npy", str(npy), "--row", str(row), "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)["result"]


def test_low_confidence_goes_to_the_workers_and_falls_back_when_they_die(tmp_path, mosquitto, example_bundle,
                                                                          large_bundle, digits_test):
    x, y = digits_test
    np.save(tmp_path / "x.npy", x)
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    workers = []
    try:
        # threshold 1.0: every request is "low confidence" and goes to a worker while one answers
        add_agent("off-1", extra=f'[model]\nbundle = "{example_bundle[0]}"\n'
                                 f'[offload]\nenabled = true\nthreshold = 1.0\nmode = "features"\ndeadline_ms = 1500\n')
        wait_for(lambda: (d := device(db, "off-1")) and d.online, what="off-1 online")

        probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/offload/workers/+",))
        workers = [worker(mosquitto.url, large_bundle, f"w{i}", tmp_path / f"w{i}.log") for i in range(2)]
        wait_for(lambda: {t.rsplit("/", 1)[1] for t, p, _ in probe.seen() if p} >= {"w0", "w1"}, timeout=30,
                 what="both workers up")
        probe.close()
        results = [infer(mosquitto.url, "off-1", tmp_path / "x.npy", i) for i in range(16)]
        assert all(r["path"] == "remote" for r in results), [(r.get("path"), r.get("offload_error"), r.get("offload_skipped")) for r in results if r["path"] != "remote"]
        assert sum(r["label"] == int(y[i]) for i, r in enumerate(results)) >= 15
        assert {r["worker"] for r in results} == {"w0", "w1"}, "two workers share the load"
        assert all("local" in r and r["remote_ms"] > 0 for r in results)
        # raw mode goes to the worker's full model
        out = fleetctl("--broker", mosquitto.url, "offload", "set", "--to", "off-1", "--mode", "raw")
        assert out.returncode == 0, out.stdout + out.stderr
        r = infer(mosquitto.url, "off-1", tmp_path / "x.npy", 3)
        assert r["path"] == "remote" and r["label"] == int(y[3])

        # the workers die: requests are still answered, locally, within the deadline
        for w in workers:
            w.kill()
            w.wait()
        t0 = time.monotonic()
        r = infer(mosquitto.url, "off-1", tmp_path / "x.npy", 5)
        assert r["path"] == "local_fallback" and r["label"] == int(y[5])
        assert time.monotonic() - t0 < 1.5 + 4.5  # the deadline + the CLI's start-up (seconds on a loaded machine)
        tel = wait_for(lambda: (d := device(db, "off-1")) and (d.telemetry or {}).get("offload", {}).get("timeouts", 0)
                       >= 1 and d.telemetry["offload"], what="offload telemetry")
        assert tel["remote_ok"] >= 17 and tel["offload_rate"] > 0.9 and tel["bytes_sent"] > 0
        assert tel["agreement"] >= 0.9
        st = fleetctl("--db", str(db), "offload", "status", "--json")
        assert json.loads(st.stdout)["devices"]["off-1"]["timeouts"] >= 1

        # a confident answer stays local (threshold 0.5)
        assert fleetctl("--broker", mosquitto.url, "offload", "set", "--to", "off-1", "--threshold",
                        "0.5").returncode == 0
        r = infer(mosquitto.url, "off-1", tmp_path / "x.npy", 7)
        assert r["path"] == "local"
        bad = fleetctl("--broker", mosquitto.url, "offload", "set", "--to", "off-1", "--deadline", "0")
        assert bad.returncode == 2
    finally:
        for w in workers:
            stop(w)
        for p in procs:
            stop(p)


def test_on_a_311_broker_the_device_routes_each_request_to_one_worker(tmp_path, example_bundle, large_bundle,
                                                                      digits_test):
    """amqtt speaks MQTT 3.1.1 only: no shared subscription, so a request on the shared topic would
    reach both workers; the board routes to one worker's own topic by their status instead."""
    from controller.broker import EmbeddedBroker

    x, y = digits_test
    np.save(tmp_path / "x.npy", x)
    with EmbeddedBroker() as b:
        db, add_agent, procs = start_fleet(tmp_path, b.url)
        workers = []
        try:
            add_agent("old-1", extra=f'[model]\nbundle = "{example_bundle[0]}"\n'
                                     f'[offload]\nenabled = true\nthreshold = 1.0\ndeadline_ms = 2000\n')
            wait_for(lambda: (d := device(db, "old-1")) and d.online, timeout=20, what="old-1 online")
            probe = Probe(int(b.url.rsplit(":", 1)[1]), subscribe=("edgefleet/v1/offload/workers/+",),
                          protocol="3.1.1")
            workers = [worker(b.url, large_bundle, f"v{i}", tmp_path / f"v{i}.log") for i in range(2)]
            # workers probe MQTT 5 first, then fall back to 3.1.1, then announce themselves
            wait_for(lambda: {t.rsplit("/", 1)[1] for t, p, _ in probe.seen() if p} >= {"v0", "v1"}, timeout=30,
                     what="both workers up")
            probe.close()
            results = [infer(b.url, "old-1", tmp_path / "x.npy", i) for i in range(6)]
            assert all(r["path"] == "remote" for r in results)
            assert sum(r["label"] == int(y[i]) for i, r in enumerate(results)) >= 5
            tel = wait_for(lambda: (d := device(db, "old-1")) and (o := (d.telemetry or {}).get("offload", {}))
                           .get("remote_ok", 0) >= 6 and o, timeout=60, what="remote answers counted")
            assert tel["routed"] >= 6 and tel["duplicate_replies"] == 0, tel
        finally:
            for w in workers:
                stop(w)
            for p in procs:
                stop(p)
