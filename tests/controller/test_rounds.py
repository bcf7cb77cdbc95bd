"""Round engine decisions, pure over a real SQLite store (no broker)."""

import numpy as np
import pytest

from controller.fl.store import RoundStore
from controller.fl.runner import strategy_for
from controller.fl.engine import RoundEngine, RunConfig, RunConfigError
from controller.fl.selection import ClientInfo
from controller.fl.strategies import FitFailure, Strategy, validate_update

G = {"dense0.weight": np.zeros((2, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}


class HandFedAvg(Strategy):
    """Sample- and staleness-weighted mean of deltas (the test's own hand-checkable rule); it
    remembers what it was given."""

    def __init__(self) -> None:
        self.calls, self.last_staleness, self.failures = 0, [], []

    def aggregate(self, global_head, results, failures=()):
        self.failures = list(failures)
        return super().aggregate(global_head, results, failures)

    def combine(self, results):
        w = np.array([r.num_samples / np.sqrt(1 + r.staleness) for r in results], dtype=np.float64)
        w /= w.sum()
        self.calls += 1
        self.last_staleness = [r.staleness for r in results]
        return {k: sum(wi * r.update[k] for wi, r in zip(w, results)) for k in results[0].update}

    def to_state(self):
        return {"calls": self.calls, "last_staleness": self.last_staleness}

    def load_state(self, state):
        self.calls, self.last_staleness = state.get("calls", 0), state.get("last_staleness", [])


def delta(v):
    return {"dense0.weight": np.full((2, 2), v, np.float32), "dense0.bias": np.full(2, v, np.float32)}


def clients(*ids, online=True):
    return [ClientInfo(i, online, 100) for i in ids]


@pytest.fixture
def store(registry_url):
    """The same round tests on SQLite and on a real PostgreSQL."""
    from controller.db import connect

    return RoundStore(connect(registry_url))


def new_run(store, run_id="r1", **cfg):
    store.create_run(run_id, RunConfig(**cfg).to_dict(), G)
    return RoundEngine(run_id, store, HandFedAvg())


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


def test_device_that_disconnects_holds_the_round_only_until_its_deadline(store):
    # looking offline is not an answer (issue 15: a broker restart makes every device look offline)
    eng = new_run(store, rounds=1, clients=3, min_clients=2, deadline_s=1000)
    for t in eng.step(0.0, clients("a", "b", "c"))[0]:
        eng.task_sent(t)
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    eng.on_update(1.0, "b", 1, 0, 10, delta(1.0), {})
    assert eng.step(2.0, clients("a", "b") + clients("c", online=False)) == ([], [])
    _, outs = eng.step(1000.0, clients("a", "b") + clients("c", online=False))
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
    eng2 = RoundEngine("r1", store, HandFedAvg())
    resend, _ = eng2.step(2.0, clients("a", "b", "c"))
    assert [t.device_id for t in resend] == [tasks[2].device_id]
    assert [u.device_id for u in store.updates("r1", 1)] == [tasks[0].device_id]
    dup = eng2.on_update(3.0, tasks[0].device_id, 1, 0, 10, delta(2.0), {})
    assert dup.duplicate and dup.accepted and dup.reason == "accepted"   # the verdict recorded the first time


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
    assert validate_update(delta(0.1), G, max_norm=10.0) == pytest.approx(np.sqrt(6 * 0.01))


# -- the engine follows the run's strategy (issue 13) ------------------------------------------

def strategy_run(store, run_id="r1", **cfg):
    """An engine over the strategy ``fleetctl serve`` builds from the run's config."""
    c = RunConfig(**cfg)
    store.create_run(run_id, c.to_dict(), G)
    return RoundEngine(run_id, store, strategy_for(c))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_strategy_param_mu_reaches_every_task(store, mode):
    eng = strategy_run(store, strategy="fedprox", strategy_params={"mu": 0.1}, mode=mode, clients=2, buffer=2)
    tasks, _ = eng.step(0.0, clients("a", "b"))
    assert sorted(t.device_id for t in tasks) == ["a", "b"]
    assert all(t.body["prox_mu"] == 0.1 for t in tasks)


def test_prox_mu_without_a_strategy_mu_is_sent_and_a_conflict_is_refused(store):
    eng = strategy_run(store, strategy="fedavg", prox_mu=0.2, clients=1, buffer=1)
    assert [t.body["prox_mu"] for t in eng.step(0.0, clients("a"))[0]] == [0.2]
    with pytest.raises(ValueError, match="conflicts"):
        strategy_for(RunConfig(strategy="fedprox", prox_mu=0.2))     # fedprox's own mu (0.01) would win


def test_the_runner_sends_what_the_strategy_configures(store):
    """The fl.task frame published to the device carries the strategy's settings."""
    from types import SimpleNamespace

    from protocol.binary import decode_frame
    from protocol.topics import Topics
    from controller.fl.runner import RoundRunner

    from controller.channel import ControlChannel

    sent = []
    channel = ControlChannel(Topics(), "ctl", lambda topic, payload, qos=0, retain=False: sent.append((topic, payload))
                             or True, connected=lambda: True)
    dev = SimpleNamespace(id="a", online=True, telemetry={"learning": {"labelled_samples": 100}}, last_seen=1e12,
                          group=None, state={})
    registry = SimpleNamespace(db=store.db, devices=lambda: [dev], commit=lambda: None)
    store.create_run("r1", RunConfig(strategy="fedprox", strategy_params={"mu": 0.1}, clients=1, buffer=1).to_dict(), G)
    RoundRunner(channel, registry, store, None, SimpleNamespace(controller=SimpleNamespace(id="ctl")),
                reject=lambda *a: None).tick(1e12)
    [(topic, payload)] = sent
    body = decode_frame(payload).envelope.body
    # fl.task is a binary frame: it travels on the bin topic (cmd carries only JSON)
    assert topic == Topics().bin("a") and body["prox_mu"] == 0.1 and body["steps"] == 20


def test_steps_asked_stay_on_a_fast_device_and_lowering_is_recorded(store):
    fast = ClientInfo("fast", True, 100, samples_per_s=1e6)
    slow = ClientInfo("slow", True, 100, samples_per_s=160.0)   # 160 * 10 s * 0.6 / 32 = 30 -> fits 20
    slower = ClientInfo("slower", True, 100, samples_per_s=32.0)  # 32 * 6 / 32 = 6 steps fit
    eng = strategy_run(store, "r2", local_steps=20, clients=3, deadline_s=10, batch_size=32)
    tasks, _ = eng.step(0.0, [fast, slow, slower])
    steps = {t.device_id: t.body["steps"] for t in tasks}
    assert steps == {"fast": 20, "slow": 20, "slower": 6}
    note = store.round("r2", 1).metrics["steps_lowered"]
    assert set(note) == {"slower"}
    assert note["slower"]["asked"] == 20 and note["slower"]["sent"] == 6 and "deadline" in note["slower"]["why"]


def test_failures_reach_the_strategy_which_may_refuse_a_new_model(store):
    eng = strategy_run(store, strategy="fedavg", strategy_params={"accept_failures": False}, rounds=1,
                       clients=3, min_clients=2, deadline_s=5)
    for t in eng.step(0.0, clients("a", "b", "c"))[0]:
        eng.task_sent(t)
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    eng.on_update(1.0, "b", 1, 0, 10, delta(1.0), {})
    assert not eng.on_update(1.0, "c", 1, 0, 10, delta(np.nan), {}).accepted
    _, outs = eng.step(2.0, clients("a", "b", "c"))
    assert outs[0].status == "failed" and "failure" in outs[0].metrics["reason"]
    assert outs[0].metrics["failures"] == [{"device": "c", "reason": "dense0.bias: NaN or inf values"}]
    assert store.run("r1").global_version == 0


def test_failures_reach_aggregate_side_by_side_with_the_results(store):
    eng = new_run(store, rounds=1, clients=4, min_clients=1, deadline_s=5)
    for t in eng.step(0.0, clients("a", "b", "c", "d"))[0]:
        eng.task_sent(t)
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    eng.on_update(1.0, "b", 1, 0, 10, delta(1e9), {})        # over the norm bound: rejected
    _, outs = eng.step(6.0, clients("a", "b", "c") + clients("d", online=False))
    assert outs[0].status == "aggregated"
    assert sorted(eng.strategy.failures, key=lambda f: f.client_id) == [
        FitFailure("b", "update L2 norm 2.45e+09 exceeds the bound 1e+04"),
        FitFailure("c", "no update by the deadline"),
        FitFailure("d", "no update by the deadline (offline at the deadline)")]
    assert [f["device"] for f in outs[0].metrics["failures"]] == ["b", "c", "d"]


def _dp_round(store, run_id, ups, **cfg):
    eng = strategy_run(store, run_id, rounds=1, clients=len(ups), min_clients=len(ups), deadline_s=5, **cfg)
    for t in eng.step(0.0, clients(*ups))[0]:
        eng.task_sent(t)
    for dev, v in ups.items():
        assert eng.on_update(1.0, dev, 1, 0, 10, delta(v), {}).accepted
    _, outs = eng.step(2.0, clients(*ups))
    assert outs[0].status == "aggregated", outs[0].metrics
    return store.run(run_id).head


def test_dp_run_uses_the_chosen_strategy(store):
    # the median of (1, 2, 3, 500) is 2.5; a uniform mean would be 126.5 (noise sigma: 1e-4 * 1e3 / 4)
    head = _dp_round(store, "r1", {"a": 1.0, "b": 2.0, "c": 3.0, "d": 500.0}, strategy="median",
                     dp={"clip": 1e3, "noise": 1e-4})
    np.testing.assert_allclose(head["dense0.bias"], [2.5, 2.5], atol=0.2)


def test_two_dp_runs_with_the_same_seed_and_updates_publish_different_heads(store):
    ups = {"a": 0.1, "b": 0.2}
    h1 = _dp_round(store, "r1", ups, seed=0, dp={"clip": 1.0, "noise": 1.0})
    h2 = _dp_round(store, "r2", ups, seed=0, dp={"clip": 1.0, "noise": 1.0})
    assert not np.allclose(h1["dense0.weight"], h2["dense0.weight"])
