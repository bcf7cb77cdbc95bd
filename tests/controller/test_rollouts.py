"""Rollout decisions (pure): waves, canary gate, failure budget, timeouts, fleet confidence."""
import pytest

from controller.rollouts.policy import RolloutConfigError, RolloutPolicy, Slot, decide, plan_waves


@pytest.mark.parametrize("n,canary,batch,sizes", [
    (10, 0.1, 0, [1, 9]),
    (10, 0.25, 3, [3, 3, 3, 1]),
    (3, 0.33, 0, [1, 2]),
    (3, 0.34, 0, [2, 1]),
    (1, 0.5, 0, [1]),          # one device: no separate canary
    (5, 0.0, 0, [5]),
    (5, 0.0, 2, [2, 2, 1]),
    (0, 0.1, 0, []),
])
def test_plan_waves(n, canary, batch, sizes):
    waves = plan_waves([f"d{i}" for i in range(n)], canary, batch)
    assert [len(w) for w in waves] == sizes
    assert [d for w in waves for d in w] == [f"d{i}" for i in range(n)]


def test_plan_waves_drops_duplicates():
    assert plan_waves(["a", "b", "a"], 0, 0) == [["a", "b"]]


@pytest.mark.parametrize("kw", [{"canary": 1.0}, {"canary": -0.1}, {"batch": -1}, {"max_failures": -1},
                                {"wave_timeout_s": 0}, {"max_confidence_drop": 2}])
def test_bad_policies(kw):
    with pytest.raises(RolloutConfigError):
        RolloutPolicy(**kw)


def test_policy_round_trip():
    p = RolloutPolicy(canary=0.2, batch=5, max_failures=2, wave_timeout_s=30, max_confidence_drop=0.05)
    assert RolloutPolicy.from_dict(p.to_dict()) == p


P = RolloutPolicy(canary=0.2, max_failures=0, wave_timeout_s=60)


def slots(statuses, online=None, waves=None):
    return [Slot(f"d{i}", (waves or [0] + [1] * (len(statuses) - 1))[i], s, True if online is None else online[i])
            for i, s in enumerate(statuses)]


def test_canary_in_progress_waits():
    d = decide(10, P, 0, 0, 2, slots(["downloading", "pending", "pending"]))
    assert d.action == "none"


def test_healthy_canary_opens_the_next_wave():
    d = decide(10, P, 0, 0, 2, slots(["applied", "pending", "pending"]))
    assert d.action == "release" and d.wave == 1


def test_failed_canary_aborts():
    d = decide(10, P, 0, 0, 2, slots(["rolled_back", "pending", "pending"]))
    assert d.action == "abort" and "1 failure" in d.reason


def test_failure_budget():
    p = RolloutPolicy(canary=0.2, max_failures=1)
    assert decide(10, p, 1, 0, 2, slots(["applied", "failed", "downloading"])).action == "none"
    d = decide(10, p, 1, 0, 2, slots(["applied", "failed", "rolled_back"]))
    assert d.action == "abort" and d.figures["failures"] == 2


def test_last_wave_finished_is_done():
    d = decide(10, P, 1, 0, 2, slots(["applied", "applied", "applied"]))
    assert d.action == "done" and d.figures["applied"] == 3


def test_offline_devices_do_not_hold_a_wave_back():
    d = decide(10, P, 1, 0, 2, slots(["applied", "applied", "released"], online=[True, True, False]))
    assert d.action == "done"


def test_canary_offline_waits_then_aborts_at_the_timeout():
    s = slots(["released", "pending"], online=[False, True])
    assert decide(10, P, 0, 0, 2, s).action == "none"
    d = decide(61, P, 0, 0, 2, s)
    assert d.action == "abort" and "no canary" in d.reason


def test_online_device_that_does_not_finish_times_out_and_counts_as_failure():
    p = RolloutPolicy(canary=0.0, max_failures=0, wave_timeout_s=60)
    s = slots(["applied", "downloading"], waves=[0, 0])
    assert decide(59, p, 0, 0, 1, s).action == "none"
    d = decide(60, p, 0, 0, 1, s)
    assert d.action == "abort" and d.timed_out == ("d1",)
    lenient = RolloutPolicy(canary=0.0, max_failures=1, wave_timeout_s=60)
    d = decide(60, lenient, 0, 0, 1, s)
    assert d.action == "done" and d.timed_out == ("d1",)


def test_fleet_confidence_drop_aborts_even_when_every_device_passed():
    p = RolloutPolicy(canary=0.5, max_failures=5, max_confidence_drop=0.05)
    s = [Slot("d0", 0, "applied", True, 0.95, 0.80), Slot("d1", 1, "pending", True)]
    d = decide(10, p, 0, 0, 2, s)
    assert d.action == "abort" and "confidence fell by 0.150" in d.reason
    ok = [Slot("d0", 0, "applied", True, 0.95, 0.93), Slot("d1", 1, "pending", True)]
    d = decide(10, p, 0, 0, 2, ok)
    assert d.action == "release" and d.figures["confidence_drop"] == pytest.approx(0.02)


def test_confidence_needs_enough_devices():
    p = RolloutPolicy(canary=0.5, max_failures=5, max_confidence_drop=0.05, min_metric_devices=2)
    s = [Slot("d0", 0, "applied", True, 0.95, 0.80), Slot("d1", 1, "pending", True)]
    assert decide(10, p, 0, 0, 2, s).action == "release"


def test_fleet_accuracy_drop_from_the_devices_shadow_evaluations():
    p = RolloutPolicy(canary=0.5, max_failures=5, max_accuracy_drop=0.01)
    s = [Slot("d0", 0, "applied", True, acc_before=0.99, acc_after=0.975), Slot("d1", 1, "pending", True)]
    d = decide(10, p, 0, 0, 2, s)
    assert d.action == "abort" and "fleet accuracy fell by 0.015" in d.reason
    s = [Slot("d0", 0, "applied", True, acc_before=0.99, acc_after=0.985), Slot("d1", 1, "pending", True)]
    assert decide(10, p, 0, 0, 2, s).action == "release"


def test_only_devices_that_need_attention_are_reconciled(tmp_path, registry_url):
    """The reconcile query: online devices on another bundle, or with a slot still in progress."""
    from controller.registry import Registry
    from controller.rollouts.store import RolloutStore
    from protocol.envelope import Envelope

    reg = Registry(registry_url)
    store = RolloutStore(reg.db, tmp_path / "artifacts")
    for dev, sha, online in (("on-old", "a" * 64, True), ("on-new", "b" * 64, True), ("off-old", "a" * 64, False),
                             ("on-new-busy", "b" * 64, True)):
        reg.record_state(Envelope(kind="state", sender=dev, body={"status": "online" if online else "offline",
                                                                   "model": {"bundle_sha256": sha}}))
    reg.record_state(Envelope(kind="state", sender="off-old", body={"status": "offline"}))
    store.create_rollout("ro-1", "2.0", "b" * 64, {}, {}, [["on-old", "on-new", "off-old", "on-new-busy"]],
                         {})
    for dev in ("on-old", "on-new", "off-old", "on-new-busy"):
        store.set_desired(dev, "b" * 64, "2.0", "ro-1")
    store.update_slot("ro-1", "on-new", status="applied")
    store.update_slot("ro-1", "on-new-busy", status="downloading")
    got = [d.device_id for d in store.needing_attention(("released", "offered", "downloading"))]
    assert got == ["on-new-busy", "on-old"]
    store.set_desired("on-new-busy", "b" * 64, "1.0", "ro-1:back")   # a ':back' id still finds its slot
    assert [d.device_id for d in store.needing_attention(("downloading",))] == ["on-new-busy", "on-old"]


def test_an_older_registry_gains_the_new_columns(tmp_path):
    import sqlite3

    from controller.rollouts.store import RolloutStore

    db = sqlite3.connect(tmp_path / "old.db")
    db.execute("CREATE TABLE rollout_devices(rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, "
               "status TEXT NOT NULL, reason TEXT, from_sha256 TEXT, from_version TEXT, conf_before REAL, "
               "conf_after REAL, offered REAL, updated REAL, PRIMARY KEY(rollout_id, device_id))")
    db.execute("INSERT INTO rollout_devices(rollout_id, device_id, wave, status) VALUES('r', 'd', 0, 'applied')")
    db.commit()
    store = RolloutStore(db, tmp_path / "a")
    s = store.slot("r", "d")
    assert s.status == "applied" and s.acc_before is None and s.acc_after is None
