"""Rollouts over a real Mosquitto to real agent processes: canary, health rollback, abort, resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from controller.registry import Registry
from protocol.envelope import Envelope, encode
from tests.helpers.fleet import ENV, ROOT, agent_config, device, fleetctl, start_agent, start_fleet, stop
from tests.helpers.learning import agent_extra, ready, shards, store, wait_run
from tests.helpers.waiting import Probe, wait_for


def start_signed_controller(url: str, db, key, log):
    return subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", url, "--db", str(db),
                             "--signing-key", str(key), "serve"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)


def variant(src, out, version, transform):
    from controller.modeltools.example import derive_bundle
    from protocol.bundle import load_head

    head = load_head(src / "head.npz")
    return derive_bundle(src, out, version, transform(head))


def with_extra_file(src, out, version, nbytes):
    """A copy of bundle ``src`` with ``nbytes`` of random data in one more file: a many-chunk transfer."""
    import shutil

    from protocol.bundle import write_manifest

    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "notes.bin").write_bytes(os.urandom(nbytes))
    m["files"]["notes.bin"] = {"role": "other"}
    m["version"] = version
    write_manifest(out, m)
    return out


def model_of(db, dev):
    d = device(db, dev)
    return ((d.state or {}).get("model") or {}) if d and d.online else {}


def events(db, dev, status=None):
    evs = [e["body"] for e in Registry(db, readonly=True).events(dev, limit=500) if e["event"] == "model.update"]
    return [e for e in evs if status is None or e["status"] == status]


@pytest.fixture
def signed_fleet(tmp_path, mosquitto):
    keys = tmp_path / "keys"
    assert fleetctl("keys", "init", "--dir", str(keys)).returncode == 0
    db = tmp_path / "registry.db"
    procs = [start_signed_controller(mosquitto.url, db, keys / "controller.pem", tmp_path / "controller.log")]
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/ctl/state",), protocol="3.1.1")
    try:
        wait_for(lambda: any(b'"online"' in p for _, p, _ in probe.seen()), timeout=60, what="controller online")
    finally:
        probe.close()
    trusted = f'[security]\ntrusted_keys = ["{keys / "controller.pub"}"]\n'

    def add_agent(dev, bundle, extra="", env=None):
        cfg = agent_config(tmp_path, dev, mosquitto.url, interval=0.5,
                           extra=f'[model]\nbundle = "{bundle}"\ntransfer_retry_s = 1.0\n{extra}' + trusted)
        p = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                             stdout=open(tmp_path / f"{dev}.log", "ab"), stderr=subprocess.STDOUT,
                             env={**ENV, **(env or {})}, cwd=ROOT)
        procs.append(p)
        return p

    def ctl(*args, timeout=120):
        return fleetctl("--broker", mosquitto.url, "--db", str(db), "--signing-key", str(keys / "controller.pem"),
                        *args, timeout=timeout)

    yield db, add_agent, ctl, keys
    for p in procs:
        stop(p)


def test_canary_rollout_health_rollback_and_abort(signed_fleet, tmp_path, example_bundle, mosquitto):
    db, add_agent, ctl, keys = signed_fleet
    v1 = example_bundle[0]
    v2 = variant(v1, tmp_path / "v2", "1.1.0", lambda h: {k: v * 1.01 for k, v in h.items()})
    # v3 loads and matches its own reference outputs, but its labels are scrambled: the quality
    # gate (shadow evaluation against the serving model) must refuse it
    v3 = variant(v2, tmp_path / "v3", "1.2.0",
                 lambda h: {k: np.roll(v, 3, axis=-1) for k, v in h.items()})
    v4 = variant(v2, tmp_path / "v4", "1.3.0", lambda h: {k: v * 0.99 for k, v in h.items()})
    devs = ["a1", "a2", "a3", "a4"]
    for d in devs:
        add_agent(d, v1)
    for d in devs:
        wait_for(lambda: model_of(db, d).get("version") == "1.0.0", timeout=30, what=f"{d} serving 1.0.0")
    assert ctl("device", "tag", "a1", "line-a").returncode == 0
    assert ctl("device", "tag", "a2", "line-a").returncode == 0

    # 1. head-only patch to a1..a3, canary first; the controller makes the patch from --from v1
    out = ctl("deploy", str(v2), "--from", str(v1), "--to", "a1,a2,a3", "--canary", "33%", "--wait", "--json",
              "--timeout", "90s")
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["status"] == "done" and r["waves"] == 2, r
    assert [d["wave"] for d in r["devices"]] == [0, 1, 1] and {d["status"] for d in r["devices"]} == {"applied"}
    for d in ("a1", "a2", "a3"):
        m = wait_for(lambda: model_of(db, d).get("version") == "1.1.0" and model_of(db, d), what=f"{d} on 1.1.0")
        assert [i["version"] for i in m["installed"]] == ["1.0.0", "1.1.0"]
        applied = wait_for(lambda: events(db, d, "applied"), what="the applied event")[-1]
        # head-only: the patch is a few KB, not the 300+ KB bundle
        assert applied["bytes"] < 20_000 and applied["chunks"] == 1, applied
        steps = [e["status"] for e in events(db, d)]
        assert steps[steps.index("downloading"):] == ["downloading", "received", "verified", "staged", "healthy",
                                                      "applied"], steps
    assert model_of(db, "a4")["version"] == "1.0.0"   # not targeted
    listed = {d["id"]: d for d in json.loads(ctl("devices", "--json").stdout)["devices"]}
    assert listed["a1"]["desired_version"] == "1.1.0" and listed["a4"]["desired_version"] is None
    shown = json.loads(ctl("device", "show", "a1", "--json").stdout)
    assert shown["tags"] == ["line-a"] and shown["desired"]["version"] == "1.1.0"
    assert "tags       line-a" in ctl("device", "show", "a1").stdout
    # dashboards: the desired version is retained per device, and each device announces an HA
    # update entity (installed = its state, latest = that desired topic)
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/ctl/desired/+", "homeassistant/update/+/model/config"))
    try:
        desired = wait_for(lambda: [json.loads(p) for t, p, r in probe.seen() if t.endswith("desired/a1") and r],
                           what="retained desired version")
        assert desired[0]["body"]["version"] == "1.1.0"
        upd = wait_for(lambda: [json.loads(p) for t, p, r in probe.seen() if t == "homeassistant/update/a1/model/config"],
                       what="HA update entity")
        assert upd[0]["latest_version_topic"] == "edgefleet/v1/ctl/desired/a1"
        assert upd[0]["state_topic"] == "edgefleet/v1/dev/a1/state"
    finally:
        probe.close()

    # 2. a model that fails the quality gate: the canary rolls back by itself, the rollout aborts,
    #    the second wave never gets it, every device keeps serving 1.1.0
    out = ctl("deploy", str(v3), "--from", str(v2), "--tag", "line-a", "--canary", "50%", "--max-failures", "0",
              "--wait", "--json", "--timeout", "90s")
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["status"] == "aborted" and "failure" in r["reason"], r
    by = {d["device"]: d for d in r["devices"]}
    assert by["a1"]["status"] == "rolled_back" and "health check failed" in by["a1"]["reason"]
    assert "shadow evaluation" in by["a1"]["reason"] or "accuracy" in by["a1"]["reason"]
    assert by["a2"]["status"] == "skipped"
    for d in ("a1", "a2"):
        assert model_of(db, d)["version"] == "1.1.0"
    rb = wait_for(lambda: events(db, "a1", "rolled_back"), what="the rolled_back event")[-1]
    assert rb["version"] == "1.2.0"

    # 3. a wave aborts past max-failures: a4 still runs 1.0.0 and the controller only holds a patch
    #    from 1.1.0, so it fails; the devices that did update are sent back to 1.1.0 (kept on them)
    from protocol.patch import make_patch
    from protocol.signing import load_private

    data, _ = make_patch(v2, v4, load_private(keys / "controller.pem"))
    (tmp_path / "v2-v4.efp").write_bytes(data)
    out = ctl("deploy", str(tmp_path / "v2-v4.efp"), "--to", "a1,a2,a3,a4", "--canary", "50%",
              "--max-failures", "0", "--wait", "--json", "--timeout", "90s")
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads(out.stdout)
    by = {d["device"]: d for d in r["devices"]}
    assert r["status"] == "aborted"
    assert by["a4"]["status"] == "failed" and "1.0.0" in by["a4"]["reason"], by["a4"]
    assert by["a1"]["status"] == "rolled_back" and by["a2"]["status"] == "rolled_back"
    for d in ("a1", "a2", "a3"):
        wait_for(lambda: model_of(db, d).get("version") == "1.1.0", timeout=30, what=f"{d} back on 1.1.0")
    assert model_of(db, "a4")["version"] == "1.0.0"

    # 3b. every device passes its own gate (1.5 points below the serving model, the manifest allows 2),
    #     but the fleet's shadow-evaluation accuracy falls by more than the rollout allows: abort, back
    def biased(h):
        h = {k: v.copy() for k, v in h.items()}
        h["dense0.bias"][3] += 5.0
        return h

    v5 = variant(v2, tmp_path / "v5", "1.4.0", biased)
    out = ctl("deploy", str(v5), "--from", str(v2), "--to", "a3", "--canary", "0", "--max-accuracy-drop", "0.005",
              "--wait", "--json", "--timeout", "60s")
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["status"] == "aborted" and "fleet accuracy fell" in r["reason"], r
    assert r["devices"][0]["acc_before"] > r["devices"][0]["acc_after"]
    wait_for(lambda: model_of(db, "a3").get("version") == "1.1.0", timeout=30, what="a3 back on 1.1.0")

    status = ctl("rollout", "status")
    assert status.returncode == 0 and "aborted" in status.stdout and "fleet accuracy" in status.stdout
    listing = json.loads(ctl("rollout", "list", "--json").stdout)["rollouts"]
    assert [x["status"] for x in listing] == ["aborted", "aborted", "aborted", "done"]

    # 4. fleetctl rollback --to: a1 and a2 (tag line-a) go back to 1.0.0, kept on the devices
    out = ctl("rollback", "--version", "1.0.0", "--tag", "line-a", "--wait", "--json", "--timeout", "60s")
    assert out.returncode == 0, out.stdout + out.stderr
    for d in ("a1", "a2"):
        wait_for(lambda: model_of(db, d).get("version") == "1.0.0", timeout=30, what=f"{d} on 1.0.0")
    assert model_of(db, "a3")["version"] == "1.1.0"


def test_interrupted_transfer_resumes_with_only_the_missing_chunks(signed_fleet, tmp_path, example_bundle):
    db, add_agent, ctl, keys = signed_fleet
    v1 = example_bundle[0]
    big = with_extra_file(v1, tmp_path / "big", "2.0.0", 2_000_000)

    agent = add_agent("r1", v1, extra="transfer_window = 4\n", env={"EDGEFLEET_FAILPOINT": "transfer_half"})
    wait_for(lambda: model_of(db, "r1").get("version") == "1.0.0", timeout=30, what="r1 on 1.0.0")
    out = ctl("deploy", str(big), "--to", "r1", "--canary", "0", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    assert agent.wait(60) == -9      # killed by the failpoint half-way through the chunks
    part = next((tmp_path / "r1" / "transfers").glob("*/patch.part"))
    assert part.stat().st_size > 2_000_000
    add_agent("r1", v1)              # restarted, without the failpoint
    wait_for(lambda: model_of(db, "r1").get("version") == "2.0.0", timeout=60, what="r1 on 2.0.0")
    applied = wait_for(lambda: events(db, "r1", "applied"), what="the applied event")[-1]
    assert applied["chunks"] >= 8 and applied["held_at_start"] == applied["chunks"] // 2, applied
    assert not list((tmp_path / "r1" / "transfers").glob("*"))   # cleaned up after the switch
    st = json.loads(ctl("rollout", "status", "--json").stdout)
    wait_for(lambda: json.loads(ctl("rollout", "status", "--json").stdout)["status"] == "done", timeout=20,
             what="rollout done")
    assert st["devices"][0]["device"] == "r1"


def test_live_shadow_refuses_a_version_that_disagrees_on_todays_inputs(signed_fleet, tmp_path, example_bundle):
    """Both candidates pass the bundle's own eval set; only the live inputs (low-contrast digits,
    which the board sees today) tell them apart."""
    from controller.modeltools.example import digits_split

    db, add_agent, ctl, keys = signed_fleet
    v1 = example_bundle[0]
    xtr, _, _, _ = digits_split(0)
    np.save(tmp_path / "live.npy", (xtr * 0.3 + 4).astype(np.float32))

    def biased(h):
        h = {k: v.copy() for k, v in h.items()}
        h["dense0.bias"][3] += 5.0      # leans to "3" when unsure: invisible on clean digits
        return h

    bad = variant(v1, tmp_path / "bad", "1.1.0", biased)
    good = variant(v1, tmp_path / "good", "1.2.0", lambda h: {k: v * 1.01 for k, v in h.items()})
    add_agent("s1", v1, extra="shadow_live_samples = 60\nshadow_live_window_s = 20\nshadow_min_agreement = 1.0\n"
                              f'[inference]\nsource = "replay"\nreplay_x = "{tmp_path / "live.npy"}"\nrate_hz = 300\n')
    wait_for(lambda: model_of(db, "s1").get("version") == "1.0.0", timeout=30, what="s1 on 1.0.0")
    out = ctl("deploy", str(bad), "--from", str(v1), "--to", "s1", "--canary", "0", "--wait", "--json",
              "--timeout", "60s")
    assert out.returncode == 1, out.stdout + out.stderr
    slot = json.loads(out.stdout)["devices"][0]
    assert slot["status"] == "rolled_back" and "live shadow" in slot["reason"], slot
    assert model_of(db, "s1")["version"] == "1.0.0"
    out = ctl("deploy", str(good), "--from", str(v1), "--to", "s1", "--canary", "0", "--wait", "--json",
              "--timeout", "60s")
    assert out.returncode == 0, out.stdout + out.stderr
    healthy = wait_for(lambda: events(db, "s1", "healthy"), what="the healthy event")[-1]
    assert healthy["version"] == "1.2.0" and healthy["live_samples"] == 60 and healthy["live_agreement"] == 1.0
    wait_for(lambda: model_of(db, "s1").get("version") == "1.2.0", what="s1 on 1.2.0")


def test_federated_run_ships_its_head_through_a_rollout(signed_fleet, tmp_path, example_bundle):
    """round start --deploy: the final global head becomes a new bundle version, shipped as a
    signed head-only patch, canary first, through each device's quality gate."""
    db, add_agent, ctl, keys = signed_fleet
    v1 = example_bundle[0]
    sh = shards(tmp_path, 3)
    for i in range(3):
        extra = agent_extra(v1, *sh[i]).replace(f'[model]\nbundle = "{v1}"\n', "")
        add_agent(f"f{i}", v1, extra=extra)
    for i in range(3):
        ready(db, f"f{i}")
    out = ctl("round", "start", "--bundle", str(v1), "--no-wait", "--json", "--max-cpu", "100", "--clients", "3",
              "--min-clients", "3", "--rounds", "2", "--steps", "20", "--deadline", "60s", "--deploy",
              "--deploy-canary", "34%")
    assert out.returncode == 0, out.stdout + out.stderr
    run_id = json.loads(out.stdout)["run_id"]
    run = wait_run(db, run_id, timeout=90)
    assert run.status == "done" and run.global_version == 2
    version = f"1.0.0+fl.{run_id[-4:]}.2"
    for i in range(3):
        wait_for(lambda: model_of(db, f"f{i}").get("version") == version, timeout=60, what=f"f{i} on {version}")
    st = wait_for(lambda: (r := json.loads(ctl("rollout", "status", f"fl-{run_id[4:]}", "--json").stdout))
                  ["status"] == "done" and r, timeout=20, what="the run's rollout done")
    assert st["waves"] == 2 and st["version"] == version
    applied = wait_for(lambda: events(db, "f0", "applied"), what="the applied event")[-1]
    assert applied["bytes"] < 20_000              # only the head travelled
    assert store(db).run(run_id).config["deploy"]["rollout_id"] == st["rollout_id"]
    # lineage names the run, its rounds, who took part and how; its parent is the built model
    chain = json.loads(ctl("model", "lineage", version, "--json").stdout)["chain"]
    fl = chain[0]["lineage"]
    assert fl["kind"] == "federated" and fl["run_id"] == run_id and len(fl["rounds"]) == 2, chain
    assert fl["devices"] == ["f0", "f1", "f2"] and fl["n_devices"] == 3 and fl["strategy"] == "fedavg"
    assert chain[1]["version"] == "1.0.0" and chain[1]["lineage"]["kind"] == "built", chain
    audit = json.loads(ctl("audit", "--json").stdout)["entries"]
    assert any(e["action"] == "round.start" and e["target"] == run_id for e in audit), audit


def test_bad_offers_and_chunks_are_refused_counted_and_survived(signed_fleet, tmp_path, example_bundle, mosquitto):
    """The test plays a hostile (or broken) sender on the broker next to the real controller."""
    from protocol.chunks import make_manifest
    from protocol.cmdauth import sign_envelope, sign_frame
    from protocol.patch import bundle_id, make_patch
    from protocol.signing import generate, load_private

    db, add_agent, ctl, keys = signed_fleet
    key = load_private(keys / "controller.pem")
    v1 = example_bundle[0]
    big = with_extra_file(v1, tmp_path / "big", "3.0.0", 300_000)
    data, _ = make_patch(None, big, key)
    man = make_manifest("hostile-test-transfer", data, 65536)
    add_agent("b1", v1)
    wait_for(lambda: model_of(db, "b1").get("version") == "1.0.0", timeout=30, what="b1 on 1.0.0")
    topic = "edgefleet/v1/dev/b1/cmd"
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/b1/data/xfer",))
    body = {"rollout_id": None, "target": {"version": "3.0.0", "bundle_sha256": bundle_id(big)}, "base": None,
            "transfer": man.to_dict()}
    try:
        # unsigned, and signed by a key the board does not trust: refused before anything happens
        probe.publish(topic, encode(Envelope(kind="model.offer", sender="controller", body=body)))
        probe.publish(topic, encode(sign_envelope(Envelope(kind="model.offer", sender="controller", body=body),
                                                  topic, generate())))
        refused = lambda: [e for e in Registry(db, readonly=True).events("b1") if e["event"] == "command.refused"]  # noqa
        reasons = wait_for(lambda: len(refused()) >= 2 and [e["body"]["reason"] for e in refused()],
                           what="two refusals")
        assert any("unsigned" in r for r in reasons) and any("not trusted" in r for r in reasons)
        # a chunk nobody offered
        probe.publish(topic, sign_frame(Envelope(kind="xfer.chunk", sender="controller",
                                                 body={"transfer_id": "nothing", "index": 0}), topic, key, blob=b"x"))
        # a properly signed offer: the board asks for chunks; we answer with a corrupt, a truncated and a
        # duplicated chunk before the good ones
        offer = sign_envelope(Envelope(kind="model.offer", sender="controller", body=body), topic, key)
        probe.publish(topic, encode(offer))
        wants = lambda: [json.loads(p)["body"] for t, p, _ in probe.seen() if t.endswith("/data/xfer")]  # noqa
        wait_for(lambda: wants(), what="a chunk request")

        def chunk(i, blob):
            return sign_frame(Envelope(kind="xfer.chunk", sender="controller",
                                       body={"transfer_id": man.transfer_id, "index": i}), topic, key, blob=blob)

        good = lambda i: data[i * man.chunk_size:(i + 1) * man.chunk_size]  # noqa: E731
        probe.publish(topic, chunk(0, b"\0" * len(good(0))))
        probe.publish(topic, chunk(1, good(1)[:-10]))
        probe.publish(topic, chunk(2, good(2)))
        probe.publish(topic, chunk(2, good(2)))
        probe.publish(topic, encode(offer))   # the same signed offer again: a replay
        for i in range(man.count):
            probe.publish(topic, chunk(i, good(i)))
        wait_for(lambda: model_of(db, "b1").get("version") == "3.0.0", timeout=30, what="b1 on 3.0.0")
        upd = wait_for(lambda: (d := device(db, "b1")) and (d.telemetry or {}).get("update", {}).get("applied") and
                       d.telemetry["update"], what="update telemetry")
        assert upd["bad_chunks"] == 2 and upd["stray_chunks"] >= 1 and upd["applied"] == 1
        assert any("replayed" in r for r in [e["body"]["reason"] for e in refused()])
        rejects = Registry(db, readonly=True).rejects()
        assert rejects.get("unknown_transfer", 0) >= 1   # the real controller never offered it
        assert fleetctl("--broker", mosquitto.url, "--signing-key", str(keys / "controller.pem"), "cmd", "b1",
                        "ping").returncode == 0
    finally:
        probe.close()


def test_a_device_that_was_away_gets_what_is_desired_when_it_returns(signed_fleet, tmp_path, example_bundle):
    db, add_agent, ctl, keys = signed_fleet
    v1 = example_bundle[0]
    v2 = variant(v1, tmp_path / "v2", "1.1.0", lambda h: {k: v * 1.01 for k, v in h.items()})
    v3 = variant(v1, tmp_path / "v3", "1.2.0", lambda h: {k: v * 1.02 for k, v in h.items()})
    add_agent("o1", v1)
    away = add_agent("o2", v1)
    for d in ("o1", "o2"):
        wait_for(lambda: model_of(db, d).get("version") == "1.0.0", timeout=30, what=f"{d} on 1.0.0")
    stop(away)
    wait_for(lambda: not device(db, "o2").online, what="o2 offline")
    # while o2 is away, two rollouts pass; it must end on what is desired now (1.2.0), not replay 1.1.0
    for b in (v2, v3):
        out = ctl("deploy", str(b), "--from", str(v1), "--to", "o1,o2", "--canary", "0", "--wait", "--json",
                  "--timeout", "60s")
        assert out.returncode == 0, out.stdout + out.stderr
        r = json.loads(out.stdout)
        by = {d["device"]: d["status"] for d in r["devices"]}
        assert by == {"o1": "applied", "o2": "released"}, r
    add_agent("o2", v1)
    wait_for(lambda: model_of(db, "o2").get("version") == "1.2.0", timeout=30, what="o2 on 1.2.0")
    assert not events(db, "o2", "downloading") or all(e["version"] == "1.2.0" for e in events(db, "o2", "downloading"))
    st = wait_for(lambda: (r := json.loads(ctl("rollout", "status", "--json").stdout)) and
                  {d["device"]: d["status"] for d in r["devices"]}["o2"] == "applied" and r, what="o2 applied")
    assert st["version"] == "1.2.0"
    first = json.loads(ctl("rollout", "list", "--json").stdout)["rollouts"][-1]
    assert {d["device"]: d["status"] for d in first["devices"]}["o2"] == "superseded"


def test_a_controller_without_the_trusted_key_is_told_at_once(tmp_path, mosquitto, example_bundle):
    """The boards trust a key this controller does not sign with: the rollout fails with the board's
    reason within seconds, not at the wave timeout, and nothing changes on the board."""
    from protocol.patch import make_patch
    from protocol.signing import load_private

    keys = tmp_path / "keys"
    assert fleetctl("keys", "init", "--dir", str(keys)).returncode == 0
    v1 = example_bundle[0]
    v2 = variant(v1, tmp_path / "v2", "1.1.0", lambda h: {k: v * 1.01 for k, v in h.items()})
    data, _ = make_patch(v1, v2, load_private(keys / "controller.pem"))
    (tmp_path / "p.efp").write_bytes(data)
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)      # this controller signs nothing
    try:
        add_agent("k1", extra=f'[model]\nbundle = "{v1}"\n[security]\ntrusted_keys = ["{keys / "controller.pub"}"]\n')
        wait_for(lambda: model_of(db, "k1").get("version") == "1.0.0", timeout=30, what="k1 on 1.0.0")
        out = fleetctl("--broker", mosquitto.url, "--db", str(db), "deploy", str(tmp_path / "p.efp"), "--to", "k1",
                       "--canary", "0", "--wait", "--json", "--timeout", "30s")
        assert out.returncode == 1, out.stdout + out.stderr
        slot = json.loads(out.stdout)["devices"][0]
        assert slot["status"] == "failed" and "offer refused: unsigned" in slot["reason"], slot
        assert model_of(db, "k1")["version"] == "1.0.0"
    finally:
        for p in procs:
            stop(p)


def test_a_broker_outage_mid_transfer_costs_a_pause_not_the_transfer(tmp_path, mosquitto, example_bundle):
    """The controller paces chunks (controller.rollout_max_bytes_per_s), so the broker can be stopped
    while the agent holds part of the patch; when it is back, the same agent process asks for the
    rest and applies it."""
    from agent.updates.transfer import PartFile
    from protocol.chunks import ChunkManifest

    keys = tmp_path / "keys"
    assert fleetctl("keys", "init", "--dir", str(keys)).returncode == 0
    conf = tmp_path / "controller.toml"
    conf.write_text("[controller]\nrollout_max_bytes_per_s = 1000000\n")
    db = tmp_path / "registry.db"
    procs = [subprocess.Popen([sys.executable, "-m", "controller.cli", "--config", str(conf), "--broker", mosquitto.url,
                               "--db", str(db), "--signing-key", str(keys / "controller.pem"), "serve"],
                              stdout=open(tmp_path / "controller.log", "wb"), stderr=subprocess.STDOUT, env=ENV,
                              cwd=ROOT)]
    try:
        v1 = example_bundle[0]
        big = with_extra_file(v1, tmp_path / "big", "2.0.0", 2_500_000)
        cfg = agent_config(tmp_path, "x1", mosquitto.url, interval=0.5,
                           extra=f'[model]\nbundle = "{v1}"\ntransfer_retry_s = 1.0\n'
                                 f'[security]\ntrusted_keys = ["{keys / "controller.pub"}"]\n')
        agent = start_agent(cfg, tmp_path / "x1.log")
        procs.append(agent)
        wait_for(lambda: model_of(db, "x1").get("version") == "1.0.0", timeout=30, what="x1 on 1.0.0")
        out = fleetctl("--broker", mosquitto.url, "--db", str(db), "deploy", str(big), "--to", "x1", "--canary", "0")
        assert out.returncode == 0, out.stdout + out.stderr
        offer = wait_for(lambda: next((tmp_path / "x1" / "transfers").glob("*/offer.json"), None)
                         if (tmp_path / "x1" / "transfers").exists() else None, timeout=30, what="a transfer")
        man = ChunkManifest.from_dict(json.loads(offer.read_text())["transfer"])
        part = PartFile(offer.parent, man)
        wait_for(lambda: len(part.held()) >= 5, timeout=20, what="some chunks on disk")
        mosquitto.stop()
        held = part.held()
        assert 5 <= len(held) < man.count, (len(held), man.count)
        import time

        time.sleep(2.0)
        mosquitto.start()
        wait_for(lambda: model_of(db, "x1").get("version") == "2.0.0", timeout=60, what="x1 on 2.0.0")
        # the state can land before the event that says so: wait for the event, do not assume it
        applied = wait_for(lambda: events(db, "x1", "applied"), what="the applied event")[-1]
        assert applied["chunks"] == man.count and applied["held_at_start"] == 0   # same process, no restart
        assert applied["seconds"] >= 2.0
        assert agent.poll() is None
    finally:
        for p in procs:
            stop(p)
