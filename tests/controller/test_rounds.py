"""Round engine decisions, pure over a real SQLite store (no broker)."""
import sqlite3

import numpy as np
import pytest

from controller.fl.store import RoundStore
from controller.fl.engine import RoundEngine, RunConfig, RunConfigError, validate_update
from controller.fl.selection import ClientInfo

G = {"dense0.weight": np.zeros((2, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}


def fedavg(global_head, results, state):
    """Sample- and staleness-weighted mean of deltas (the test's own hand-checkable rule)."""
    w = np.array([n / np.sqrt(1 + s) for _, n, s in results], dtype=np.float64)
    w /= w.sum()
    new = {k: (global_head[k] + sum(wi * r[0][k] for wi, r in zip(w, results))).astype(np.float32) for k in global_head}
    return new, {"calls": state.get("calls", 0) + 1, "last_staleness": [s for _, _, s in results]}


def delta(v):
    return {"dense0.weight": np.full((2, 2), v, np.float32), "dense0.bias": np.full(2, v, np.float32)}


def clients(*ids, online=True):
    return [ClientInfo(i, online, 100) for i in ids]


@pytest.fixture
def store(tmp_path):
    return RoundStore(sqlite3.connect(tmp_path / "r.db"))


def new_run(store, run_id="r1", **cfg):
    store.create_run(run_id, RunConfig(**cfg).to_dict(), G)
    return RoundEngine(run_id, store, fedavg)


def test_sync_round_aggregates_what_arrived_by_the_deadline(store):
    eng = new_run(store, rounds=1, clients=3, min_clients=2, deadline_s=10)
    tasks, _ = eng.step(0.0, clients("a", "b", "c"))
    assert sorted(t.device_id for t in tasks) == ["a", "b", "c"]
    assert tasks[0].body["base_version"] == 0 and tasks[0].body["deadline_ts"] == 10.0
    for t in tasks:
        eng.task_sent(t)
    assert eng.on_update(1.0, "a", 1, 0, 30, delta(1.0), {"train_loss": 0.5}).accepted
    assert eng.on_update(2.0, "b", 1, 0, 10, delta(3.0), {"train_loss": 0.7}).accepted
    assert eng.step(5.0, clients("a", "b", "c")) == ([], [])   # c still working, deadline not reached
    _, outs = eng.step(10.5, clients("a", "b", "c"))
    assert [o.status for o in outs] == ["aggregated"]
    run = store.run("r1")
    assert run.global_version == 1
    np.testing.assert_allclose(run.head["dense0.bias"], [1.5, 1.5])   # (30*1 + 10*3) / 40
    assert outs[0].metrics["mean_train_loss"] == pytest.approx(0.6)
    late = eng.on_update(11.0, "c", 1, 0, 10, delta(9.0), {})
    assert not late.accepted
    eng.step(12.0, clients("a", "b", "c"))
    assert store.run("r1").status == "done"


def test_device_that_disconnects_never_stalls_the_round(store):
    eng = new_run(store, rounds=1, clients=3, min_clients=2, deadline_s=1000)
    for t in eng.step(0.0, clients("a", "b", "c"))[0]:
        eng.task_sent(t)
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    eng.on_update(1.0, "b", 1, 0, 10, delta(1.0), {})
    _, outs = eng.step(2.0, clients("a", "b") + clients("c", online=False))
    assert outs and outs[0].status == "aggregated" and outs[0].metrics["dropped"] == ["c"]


def test_quorum_not_met_means_no_new_model(store):
    eng = new_run(store, rounds=2, clients=2, min_clients=2, deadline_s=5)
    for t in eng.step(0.0, clients("a", "b"))[0]:
        eng.task_sent(t)
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    tasks, outs = eng.step(6.0, clients("a", "b"))
    assert outs[0].status == "failed" and "quorum" in outs[0].metrics["reason"]
    assert store.run("r1").global_version == 0
    assert {t.round_no for t in tasks} == {2}  # the next round starts


def test_restart_resumes_without_resending_or_losing_updates(store):
    eng = new_run(store, rounds=1, clients=3, min_clients=3, deadline_s=100)
    tasks, _ = eng.step(0.0, clients("a", "b", "c"))
    eng.task_sent(tasks[0])
    eng.task_sent(tasks[1])
    eng.on_update(1.0, tasks[0].device_id, 1, 0, 10, delta(2.0), {})
    # controller killed here; a new engine over the same store
    eng2 = RoundEngine("r1", store, fedavg)
    resend, _ = eng2.step(2.0, clients("a", "b", "c"))
    assert [t.device_id for t in resend] == [tasks[2].device_id]
    assert [u.device_id for u in store.updates("r1", 1)] == [tasks[0].device_id]
    dup = eng2.on_update(3.0, tasks[0].device_id, 1, 0, 10, delta(2.0), {})
    assert not dup.accepted and "duplicate" in dup.reason


@pytest.mark.parametrize("bad,why", [
    ({"dense0.weight": np.full((2, 2), np.nan, np.float32), "dense0.bias": np.zeros(2, np.float32)}, "NaN"),
    ({"dense0.weight": np.full((2, 2), 1e6, np.float32), "dense0.bias": np.zeros(2, np.float32)}, "norm"),
    ({"dense0.weight": np.zeros((3, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}, "shape"),
    ({"dense0.weight": np.zeros((2, 2), np.float32)}, "names"),
    ({"dense0.weight": np.zeros((2, 2), np.int32), "dense0.bias": np.zeros(2, np.float32)}, "dtype"),
])
def test_poisoned_updates_are_rejected_never_aggregated(store, bad, why):
    eng = new_run(store, rounds=1, clients=2, min_clients=1, deadline_s=5, max_update_norm=100.0)
    for t in eng.step(0.0, clients("a", "b"))[0]:
        eng.task_sent(t)
    v = eng.on_update(1.0, "a", 1, 0, 10, bad, {})
    assert not v.accepted and why in v.reason
    eng.on_update(1.0, "b", 1, 0, 10, delta(0.5), {})
    _, outs = eng.step(6.0, clients("a", "b"))
    np.testing.assert_allclose(store.run("r1").head["dense0.bias"], [0.5, 0.5])


def test_async_buffer_applies_stale_update_with_staleness_weight(store):
    eng = new_run(store, mode="async", rounds=3, clients=2, min_clients=1, buffer=2, max_staleness=1, deadline_s=100)
    tasks, _ = eng.step(0.0, clients("fast", "slow"))
    assert sorted(t.device_id for t in tasks) == ["fast", "slow"]
    for t in tasks:
        eng.task_sent(t)
    # fast reports twice from versions 0 and... first window needs 2 updates: fast + slow(v0)
    assert eng.on_update(1.0, "fast", 1, 0, 10, delta(1.0), {}).accepted
    assert eng.maybe_aggregate_async(1.0) is None
    # fast is idle again: it gets a new task while slow is still busy
    t2, _ = eng.step(1.5, clients("fast", "slow"))
    assert [t.device_id for t in t2] == [] or all(t.device_id == "fast" for t in t2)
    assert eng.on_update(2.0, "slow", 1, 0, 10, delta(3.0), {}).accepted
    out = eng.maybe_aggregate_async(2.0)
    assert out and out.new_version == 1
    np.testing.assert_allclose(store.run("r1").head["dense0.bias"], [2.0, 2.0])
    # window 2: fast from v1 (fresh), slow from v0 (staleness 1, weight 1/sqrt(2))
    t3, _ = eng.step(3.0, clients("fast", "slow"))
    for t in t3:
        eng.task_sent(t)
    assert eng.on_update(4.0, "fast", 2, 1, 10, delta(1.0), {}).accepted
    assert eng.on_update(4.0, "slow", 2, 0, 10, delta(-1.0), {}).accepted
    out = eng.maybe_aggregate_async(4.0)
    w_fast, w_slow = 1.0, 1 / np.sqrt(2)
    expect = 2.0 + (w_fast * 1.0 + w_slow * -1.0) / (w_fast + w_slow)
    np.testing.assert_allclose(store.run("r1").head["dense0.bias"], [expect, expect], rtol=1e-6)
    assert store.run("r1").strategy_state["last_staleness"] == [0, 1]
    # staleness 2 > max 1: refused
    v = eng.on_update(5.0, "slow", 3, 0, 10, delta(1.0), {})
    assert not v.accepted and "stale" in v.reason


def test_not_enough_clients_waits_then_fails(store):
    eng = new_run(store, rounds=1, clients=3, min_clients=2, start_timeout_s=10)
    assert eng.step(0.0, clients("a")) == ([], [])
    assert store.run("r1").status == "running"
    eng.step(11.0, clients("a"))
    assert store.run("r1").status == "failed" and "eligible" in store.run("r1").error


def test_config_validation():
    with pytest.raises(RunConfigError):
        RunConfig(mode="weird")
    with pytest.raises(RunConfigError):
        RunConfig(clients=2, min_clients=3)
    with pytest.raises(RunConfigError, match="unknown"):
        RunConfig.from_dict({"bogus": 1})
    assert validate_update(delta(0.1), G, 10.0) is None
