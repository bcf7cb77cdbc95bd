"""Operator CLI for rollouts and rounds (issue 17): every flag checked before anything is created;
``rollout pause|resume|abort`` and ``round stop`` persisted, survived by a restart, carried out by the
runner; the soak. Registry-level, no broker: the runner's channel is a recorder of what it would send."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from controller.cli import cli
from controller.config import parse_config
from controller.registry import Registry
from controller.rollouts.policy import RolloutPolicy, Slot, decide, fleet_metrics
from controller.rollouts.store import RolloutStore
from protocol.envelope import Envelope

from .test_artifact_quarantine import write_bundle


def online(reg: Registry, dev: str, version: str = "1.0.0", sha: str = "a" * 64) -> None:
    reg.record_state(Envelope(kind="state", sender=dev, body={
        "status": "online", "model": {"version": version, "bundle_sha256": sha,
                                      "installed": [{"version": version, "bundle_sha256": sha}]}}))


@pytest.fixture
def fleet(tmp_path):
    db = tmp_path / "registry.db"
    reg = Registry(db)
    for d in ("a1", "a2", "a3"):
        online(reg, d)
    reg.commit()
    bundle = write_bundle(tmp_path / "v2", "1.1.0", 2, b"backbone" * 100)
    yield db, reg, bundle
    reg.close()


def ctl(db: Path, *args: str):
    return CliRunner().invoke(cli, ["--db", str(db), *args], catch_exceptions=False)


def counts(db: Path) -> tuple[int, int]:
    """(rollouts, artifacts) stored so far (0, 0 before the first deploy made the tables)."""
    store = RolloutStore.open(str(db))
    return (len(store.rollouts()), store.db.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0])


@pytest.mark.parametrize("bad,flag", [
    (["--wait", "--timeout", "BAD"], "--timeout"),
    (["--wait", "--timeout", "0"], "--timeout"),          # old code: made the rollout, then gave up at once
    (["--wave-timeout", "0s"], "--wave-timeout"),         # old code: stored the artifact first
    (["--soak", "soon"], "--soak"),
    (["--canary", "150%"], "--canary"),
])
def test_deploy_bad_flag_creates_nothing(fleet, bad, flag):
    db, _, bundle = fleet
    out = ctl(db, "deploy", str(bundle), "--all", *bad)
    assert out.exit_code == 2, out.output
    assert flag in out.output and bad[-1] in out.output, out.output
    assert counts(db) == (0, 0)


def test_deploy_unknown_device_stores_no_artifact(fleet):
    db, _, bundle = fleet
    out = ctl(db, "deploy", str(bundle), "--to", "a1,zz9")
    assert out.exit_code == 2 and "zz9" in out.output, out.output
    assert counts(db) == (0, 0)


def test_rollback_bad_timeout_creates_nothing_and_the_new_spelling(fleet):
    db, _, _ = fleet
    out = ctl(db, "rollback", "--version", "1.0.0", "--to", "a1", "--wait", "--timeout", "0s")
    assert out.exit_code == 2 and "--timeout" in out.output, out.output
    assert counts(db)[0] == 0
    out = ctl(db, "rollback", "--version", "1.0.0", "--to", "a1,a2", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["version"] == "1.0.0" and [d["device"] for d in r["devices"]] == ["a1", "a2"]
    # the old spellings still work where they cannot be confused, with a warning
    old = CliRunner().invoke(cli, ["--db", str(db), "rollback", "--to", "1.0.0", "--devices", "a3"])
    assert old.exit_code == 0 and "deprecated" in old.stderr, old.output + old.stderr
    old = CliRunner().invoke(cli, ["--db", str(db), "rollback", "--to", "1.0.0", "--all"])
    assert old.exit_code == 0 and "deprecated" in old.stderr, old.output + old.stderr
    out = ctl(db, "rollback", "--to", "a1")
    assert out.exit_code == 2 and "--version" in out.output


@pytest.mark.parametrize("flag,value,words", [
    ("--dp", "noise=abc", ["noise=abc", "float"]),
    ("--dp", "clipp=1.0", ["clipp", "unknown dp"]),
    ("--compress", "topkk=0.1", ["topkk=0.1", "unknown compression"]),
    ("--compress", "topk=2", ["topk=2", "(0, 1]"]),
    ("--compress", "int8=yes", ["int8", "true or false"]),
])
def test_round_start_settings_refused_at_parse_time(fleet, tmp_path, flag, value, words):
    db, _, bundle = fleet
    out = ctl(db, "round", "start", "--bundle", str(bundle), flag, value, "--no-wait")
    assert out.exit_code == 2, out.output
    assert f"Invalid value for '{flag}'" in out.output, out.output
    for w in words:
        assert w in out.output, out.output
    from controller.fl.store import RoundStore

    assert RoundStore.open(str(db)).runs() == []


# -- pause / resume / abort ------------------------------------------------------------------------

class Recorder:
    """The runner's channel: records what it would publish (no broker in a registry-level test)."""

    def __init__(self) -> None:
        from protocol.signing import generate

        self.key = generate()   # patches are made (and signed) for the offers
        self.desired: list[tuple[str, str]] = []

    def set_desired(self, device_id, body):
        self.desired.append((device_id, body["version"]))

    def send(self, *a, **kw):
        return True

    command = send_frame = send


def runner(db: Path):
    """A fresh RolloutRunner on its own connection: what a (re)started ``fleetctl serve`` runs."""
    from controller.rollouts.runner import RolloutRunner

    reg = Registry(db)
    store = RolloutStore(reg.db, db.parent / "artifacts")
    return RolloutRunner(Recorder(), reg, store, parse_config({}), lambda *a: None), reg  # type: ignore[arg-type]


def deploy(db: Path, bundle: Path, *extra: str) -> str:
    out = ctl(db, "deploy", str(bundle), "--all", "--canary", "10%", "--json", *extra)
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)["rollout_id"]


def test_pause_holds_the_next_wave_across_a_restart_then_resume(fleet):
    db, reg, bundle = fleet
    rid = deploy(db, bundle, "--soak", "0")
    run, r_reg = runner(db)
    run.tick(time.time())                       # wave 1 (the canary) released
    st = run.store
    assert st.rollout(rid).wave == 0
    assert [s.status for s in st.slots(rid)] == ["offered", "pending", "pending"]
    canary = st.slots(rid)[0].device_id
    assert ctl(db, "rollout", "pause", rid).exit_code == 0
    r_reg.close()
    run, r_reg = runner(db)                     # the controller restarts: the pause is in the file
    st = run.store
    st.update_slot(rid, canary, status="applied")
    st.commit()
    for _ in range(3):
        run.tick(time.time())
    r = st.rollout(rid)
    assert r.status == "paused" and r.wave == 0, r   # the canary finished: no wave while paused
    again = ctl(db, "rollout", "pause", rid)
    assert again.exit_code == 1 and "paused" in again.output
    assert ctl(db, "rollout", "resume", rid).exit_code == 0
    st.refresh()
    run.tick(time.time())
    r = st.rollout(rid)
    assert r.status == "running" and r.wave == 1, r
    r_reg.close()


@pytest.mark.parametrize("keep", [False, True])
def test_abort_is_persisted_first_and_finished_after_a_restart(fleet, keep):
    db, reg, bundle = fleet
    rid = deploy(db, bundle, "--soak", "0")
    run, r_reg = runner(db)
    run.tick(time.time())
    st = run.store
    canary = st.slots(rid)[0].device_id
    st.set_desired(canary, st.rollout(rid).bundle_sha256, "1.1.0", rid)
    st.update_slot(rid, canary, status="applied")
    st.commit()
    r_reg.close()                               # the controller is down while the operator aborts
    out = ctl(db, "rollout", "abort", rid, *(["--keep-updated"] if keep else []))
    assert out.exit_code == 0 and "aborting" in out.output, out.output
    assert RolloutStore.open(str(db)).rollout(rid).status == "aborting"
    run, r_reg = runner(db)                     # restarted: it carries the abort out
    run.tick(time.time())
    st = run.store
    r = st.rollout(rid)
    assert r.status == "aborted" and r.reason == "aborted by the operator", r
    slots = {s.device_id: s for s in st.slots(rid)}
    assert {slots[d].status for d in slots if d != canary} == {"skipped"}
    assert slots[canary].status == ("applied" if keep else "rolled_back")
    assert (canary, "1.0.0") in run.channel.desired or keep
    assert ctl(db, "rollout", "resume", rid).exit_code == 1
    r_reg.close()


# -- soak (pure) -----------------------------------------------------------------------------------

def _slots(statuses, conf_after=None):
    return [Slot(f"d{i}", 0 if i == 0 else 1, s, True, 0.9, (conf_after or [None] * len(statuses))[i])
            for i, s in enumerate(statuses)]


def test_soak_holds_a_finished_wave_then_releases():
    p = RolloutPolicy(canary=0.3, soak_s=60)
    s = _slots(["applied", "pending", "pending"])
    assert decide(10, p, 0, 0, 2, s).action == "soak"                       # persist the soak's start
    d = decide(40, p, 0, 0, 2, s, soak_started=10)
    assert d.action == "none" and d.figures["soak_left_s"] == 30
    assert decide(70, p, 0, 0, 2, s, soak_started=10).action == "release"
    last = [Slot("d0", 0, "applied", True), Slot("d1", 1, "applied", True)]
    assert decide(80, p, 1, 70, 2, last).action == "soak"                   # the last wave soaks too
    assert decide(200, p, 1, 70, 2, last, soak_started=80).action == "done"


def test_confidence_falling_during_the_soak_aborts_before_the_next_wave():
    p = RolloutPolicy(canary=0.3, soak_s=60, max_confidence_drop=0.05)
    d = decide(30, p, 0, 0, 2, _slots(["applied", "pending"], [0.8, None]), soak_started=10)
    assert d.action == "abort" and "confidence" in d.reason and d.figures["confidence_drop"] == pytest.approx(0.1)
    failed = decide(30, p, 0, 0, 2, _slots(["rolled_back", "pending"]), soak_started=10)
    assert failed.action == "abort"


def test_fleet_metrics_over_the_updated_devices():
    m = fleet_metrics([{"inferences": 90, "input_errors": 10, "mean_confidence": 0.9, "latency_ms": {"p95_ms": 4.0}},
                       {"inferences": 100, "input_errors": 0, "mean_confidence": 0.7, "latency_ms": {"p95_ms": 9.5}}])
    assert m == {"devices": 2, "inferences": 190, "mean_confidence": 0.8, "error_rate": 0.05, "p95_latency_ms": 9.5}
    assert fleet_metrics([]) == {"devices": 0, "inferences": 0}


def test_soak_defaults_and_old_policies():
    assert RolloutPolicy.from_dict({"canary": 0.1}).soak_s == 0          # rollouts stored before soaking
    with pytest.raises(ValueError):
        RolloutPolicy(soak_s=-1)


# -- round stop ------------------------------------------------------------------------------------

def test_round_stop_ends_the_run_and_nothing_aggregates_after_it(fleet):
    from controller.fl.engine import RoundEngine
    from controller.fl.runner import strategy_for
    from controller.fl.engine import RunConfig
    from controller.fl.store import RoundStore

    db, _, _ = fleet
    head = {"dense0.weight": np.zeros((2, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}
    store = RoundStore.open(str(db))
    cfg = RunConfig(clients=2, min_clients=1, rounds=3)
    store.create_run("run-x", cfg.to_dict(), head)
    store.update_run("run-x", status="running")
    store.start_round("run-x", 1, time.time(), time.time() + 60, ("a1", "a2"), {"a1": 5, "a2": 5})
    out = ctl(db, "round", "stop", "run-x", "--json")
    assert out.exit_code == 0, out.output
    s = json.loads(out.output)
    assert s["status"] == "stopped" and s["rounds"][0]["status"] == "stopped", s
    # the service (another connection) had the round open: its aggregation is refused
    from controller.fl.strategies import FitResult

    eng = RoundEngine("run-x", store, strategy_for(cfg))
    delta = {k: np.ones_like(v) for k, v in head.items()}
    o = eng._apply(1, [FitResult(delta, 10, 0, "a1"), FitResult(delta, 10, 0, "a2")], [], {})
    assert o.status == "stopped" and store.run("run-x").global_version == 0, o
    assert store.round("run-x", 1).status == "stopped"
    store.update_run("run-x", status="done")            # a late write of the runner never undoes the stop
    assert store.run("run-x").status == "stopped"
    assert ctl(db, "round", "stop", "run-x").exit_code == 1


def test_a_run_that_cannot_start_says_why_then_fails_with_the_reason(tmp_path):
    from controller.fl.engine import RoundEngine, RunConfig
    from controller.fl.runner import strategy_for
    from controller.fl.selection import ClientInfo
    from controller.fl.store import RoundStore

    store = RoundStore.open(str(tmp_path / "r.db"))
    cfg = RunConfig(clients=2, min_clients=2, rounds=1, max_cpu_percent=50, start_timeout_s=30)
    store.create_run("run-w", cfg.to_dict(), {"dense0.bias": np.zeros(2, np.float32)})
    eng = RoundEngine("run-w", store, strategy_for(cfg))
    busy = [ClientInfo("pi-1", True, 100, cpu_percent=93.0), ClientInfo("pi-2", True, 100, cpu_percent=20.0)]
    assert eng.step(100.0, busy) == ([], [])
    run = store.run("run-w")
    assert run.status == "running" and "busy (cpu > 50%) on 1: pi-1" in run.waiting, run.waiting
    eng.step(131.0, busy)
    run = store.run("run-w")
    assert run.status == "failed" and "no round could start in 30s" in run.error and "pi-1" in run.error, run.error
    # the CLI prints the reason, not only `round status`
    out = CliRunner().invoke(cli, ["--db", str(tmp_path / "r.db"), "round", "status", "run-w"])
    assert "no round could start" in out.output


def test_round_start_picks_devices_like_every_other_command(fleet):
    from controller.fl.engine import RunConfig
    from controller.fl.selection import ClientInfo, select
    from controller.fl.store import RoundStore

    db, _, bundle = fleet
    ok = ctl(db, "round", "start", "--bundle", str(bundle), "--to", "a1,a3", "--clients", "2", "--no-wait", "--json")
    assert ok.exit_code == 0, ok.output
    run = RoundStore.open(str(db)).runs()[0]
    cfg = RunConfig.from_dict(run.config)
    assert list(cfg.devices) == ["a1", "a3"]
    sel = select([ClientInfo(d, True, 100) for d in ("a1", "a2", "a3")], cfg.policy())
    assert sel.selected == ("a1", "a3") and sel.excluded == {"a2": "not picked (--to/--tag)"}
    bad = ctl(db, "round", "start", "--bundle", str(bundle), "--to", "a/+", "--no-wait")
    assert bad.exit_code == 2 and "--to" in bad.output
    both = ctl(db, "round", "start", "--bundle", str(bundle), "--to", "a1", "--group", "g", "--no-wait")
    assert both.exit_code == 2 and "at most one" in both.output


def test_rollout_status_shows_confidence_and_fleet_figures(fleet):
    db, _, bundle = fleet
    rid = deploy(db, bundle, "--soak", "30s")
    st = RolloutStore.open(str(db))
    st.update_slot(rid, "a1", status="applied", conf_before=0.91, conf_after=0.0029)
    st.update_rollout(rid, figures={"failures": 0, "applied": 1, "soak_left_s": 12.5,
                                    "fleet": {"devices": 1, "inferences": 40, "mean_confidence": 0.0029,
                                              "error_rate": 0.0, "p95_latency_ms": 3.5}})
    st.commit()
    out = ctl(db, "rollout", "status", rid)
    assert out.exit_code == 0, out.output
    assert "CONF AFTER" in out.output and "0.91" in out.output and "0.0029" in out.output, out.output
    assert "40 inferences" in out.output and "12.5 s left" in out.output, out.output
