"""A secure round without a broker: the session driver, the engine taking the sum as the round's
one update, and the combinations that are refused."""
import sqlite3

import numpy as np
import pytest

from controller.fl.engine import RoundEngine, RunConfig, RunConfigError
from controller.fl.secure import SecAggConfig, SecureRound, unflatten
from controller.fl.selection import ClientInfo
from controller.fl.store import RoundStore
from controller.fl.strategies import make
from protocol.secagg import SecAggClient
from protocol.secagg_wire import flatten, from_wire, to_wire

pytest.importorskip("Crypto.Protocol.SecretSharing")

HEAD = {"dense0.weight": np.zeros((3, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}


def test_refused_combinations():
    with pytest.raises(RunConfigError, match="mean-based"):
        RunConfig(strategy="median", secagg={"max_dropout": 0.3})
    with pytest.raises(RunConfigError, match="compress"):
        RunConfig(secagg={"stage_s": 5}, compression={"topk": 0.1})
    with pytest.raises(RunConfigError, match="unknown secagg"):
        RunConfig(secagg={"dropout": 0.3})
    with pytest.raises(RunConfigError, match="max_dropout"):
        RunConfig(secagg={"max_dropout": 0.6})
    assert SecAggConfig.from_dict(None) is None


def test_a_secure_round_aggregates_the_weighted_mean_with_one_board_dropping():
    store = RoundStore(sqlite3.connect(":memory:"))
    cfg = RunConfig(strategy="fedavg", rounds=1, clients=4, min_clients=3, min_samples=1,
                    secagg={"max_dropout": 0.25, "stage_s": 5})
    store.create_run("run-s", cfg.to_dict(), HEAD)
    eng = RoundEngine("run-s", store, make("fedavg"))
    infos = [ClientInfo(f"d{i}", True, 50) for i in range(4)]
    tasks, _ = eng.step(100.0, infos)
    assert tasks[0].body["secagg"] == {"session": "run-s#1"}
    sess = SecureRound("run-s", 1, tuple(store.round("run-s", 1).selected), {k: v.shape for k, v in HEAD.items()},
                       SecAggConfig(0.25, 5.0), deadline=160.0)
    eng.hold.add(1)
    rng = np.random.default_rng(0)
    deltas = {f"d{i}": {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in HEAD.items()} for i in range(4)}
    ns = {"d0": 10, "d1": 30, "d2": 20, "d3": 40}
    boards = {d: SecAggClient("run-s#1", d) for d in deltas}

    def deliver(msgs, stage_reply):
        for dev, body in msgs:
            m = from_wire(body)
            reply = stage_reply(boards[dev], m, dev)
            if reply is not None:
                b, t = to_wire(reply)
                assert sess.on_message(dev, b, t, 100) is None

    for d, bd in boards.items():
        b, t = to_wire(bd.advertise())
        assert sess.on_message(d, b, t, 100) is None
    assert eng.step(120.0, infos)[1] == []                     # held: no update rows, not closed
    deliver(sess.poll(120.0), lambda bd, m, d: bd.on_roster(m))
    deliver(sess.poll(121.0), lambda bd, m, d: None if d == "d3" else bd.on_inbox(m, flatten(deltas[d], ns[d])))
    assert sess.poll(122.0) == []                              # d3 has not masked: wait for the stage
    deliver(sess.poll(127.0), lambda bd, m, d: bd.on_unmask(m))
    assert sess.ready(127.0)
    mean, n, meta = sess.result()
    assert n == 60 and meta["secagg_dropped"] == ["d3"] and meta["secagg_clients"] == 3
    want = {k: sum(ns[d] * deltas[d][k] for d in ("d0", "d1", "d2")) / 60 for k in HEAD}
    for k in HEAD:
        np.testing.assert_allclose(mean[k], want[k], atol=1e-6)
    v = eng.on_secure_result(128.0, 1, mean, n, meta)
    assert v.accepted
    _, outs = eng.step(128.5, infos)
    assert outs and outs[0].status == "aggregated" and outs[0].metrics["secagg_dropped"] == ["d3"]
    assert [u.device_id for u in store.updates("run-s", 1)] == ["secagg"]
    for k in HEAD:
        np.testing.assert_allclose(eng.run.head[k], want[k], atol=1e-6)
    assert [f["device"] for f in outs[0].metrics["failures"]] == ["d3"]


def test_session_refuses_a_message_for_a_stage_devices_do_not_send():
    sess = SecureRound("r", 1, ("a", "b"), {"w": (2,)}, SecAggConfig(), deadline=10.0)
    assert "not sent by devices" in sess.on_message("a", {"stage": "roster", "session": "r#1", "threshold": 2,
                                                          "length": 3, "scale_bits": 28, "clients": []}, None, 10)
    assert "replayed" in sess.on_message("a", {"stage": "advertise", "session": "r#0", "client": "a",
                                               "c_pk": "", "s_pk": ""}, None, 10)


def test_unflatten_inverts_flatten():
    d = {"b": np.array([1.0, 2.0], np.float32), "a": np.ones((2, 2), np.float32)}
    mean, n = unflatten(flatten(d, 4), {k: v.shape for k, v in d.items()})
    assert n == 4 and np.allclose(mean["a"], 1) and np.allclose(mean["b"], [1, 2])
