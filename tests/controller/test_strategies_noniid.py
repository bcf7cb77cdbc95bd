"""FedAvgM, SCAFFOLD and FedAdam's bias correction / Flower mode on cases computed by hand."""
import math
import sqlite3

import numpy as np
import pytest

from agent.learning import scaffold as sc
from agent.learning.trainer import HeadTrainer, TrainConfig
from controller.fl.engine import RoundEngine, RunConfig
from controller.fl.selection import ClientInfo
from controller.fl.store import RoundStore
from controller.fl.strategies import FitResult, UpdateRejected, make, validate_update

G = {"w": np.array([1.0, 1.0], np.float32)}


def d(*v):
    return {"w": np.array(v, np.float32)}


def test_fedavgm_two_rounds_by_hand():
    s = make("fedavgm", eta=0.5, beta=0.9)
    w1 = s.aggregate_deltas(G, [(d(1, 0), 1, 0), (d(3, 2), 1, 0)])      # mean Δ = (2, 1); v = (2, 1)
    np.testing.assert_allclose(w1["w"], [1 + 0.5 * 2, 1 + 0.5 * 1])
    s2 = make("fedavgm", eta=0.5, beta=0.9)
    s2.load_state(s.to_state())                                        # a restarted controller resumes
    w2 = s2.aggregate_deltas(w1, [(d(-1, 1), 1, 0)])                    # v = 0.9 (2, 1) + (-1, 1) = (0.8, 1.9)
    np.testing.assert_allclose(w2["w"], [2 + 0.5 * 0.8, 1.5 + 0.5 * 1.9], rtol=1e-6)


def test_fedavgm_with_beta_zero_is_fedavg_times_eta():
    ups = [(d(1, 2), 3, 0), (d(-1, 0), 1, 0)]
    a = make("fedavgm", eta=1.0, beta=0.0).aggregate_deltas(G, ups)
    b = make("fedavg").aggregate_deltas(G, ups)
    np.testing.assert_allclose(a["w"], b["w"])
    with pytest.raises(ValueError):
        make("fedavgm", beta=1.0)


def scaffold_result(dy, dc, cid):
    return FitResult({"w": np.array(dy, np.float32), "cv.w": np.array(dc, np.float32)}, 10, 0, cid)


def test_scaffold_server_step_by_hand():
    s = make("scaffold", eta=1.0, num_clients=4)
    assert set(s.task_tensors(G)) == {"w", "cv.w"} and not s.task_tensors(G)["cv.w"].any()
    new = s.aggregate(G, [scaffold_result([2, 0], [1, 1], "a"), scaffold_result([0, 2], [3, -1], "b")])
    np.testing.assert_allclose(new["w"], [2, 2])             # x + mean Δy (uniform: SCAFFOLD's mean)
    np.testing.assert_allclose(s.c["w"], [0.5 * 2, 0.5 * 0])  # c + |S|/N mean Δc = 2/4 (2, 0)
    assert set(new) == {"w"}
    s2 = make("scaffold", eta=1.0, num_clients=4)
    s2.load_state(s.to_state())
    np.testing.assert_allclose(s2.task_tensors(new)["cv.w"], [1, 0])


def test_scaffold_without_fleet_size_counts_devices_seen():
    s = make("scaffold")
    s.aggregate(G, [scaffold_result([0, 0], [4, 4], "a"), scaffold_result([0, 0], [0, 0], "b")])
    np.testing.assert_allclose(s.c["w"], [2, 2])             # N = 2 seen: c += mean Δc
    s.aggregate(G, [scaffold_result([0, 0], [2, 2], "c")])   # N = 3 now, |S| = 1
    np.testing.assert_allclose(s.c["w"], [2 + 2 / 3, 2 + 2 / 3], rtol=1e-6)


def test_scaffold_update_must_carry_control_variates():
    s = make("scaffold")
    with pytest.raises(UpdateRejected):
        validate_update(d(1, 1), s.expected_update(G))
    validate_update({"w": np.ones(2, np.float32), "cv.w": np.ones(2, np.float32)}, s.expected_update(G))


def test_scaffold_client_option_two_by_hand():
    x, y = d(1, 1), d(0.5, 1.5)
    c, ci = d(0.1, 0.0), d(0.0, 0.2)
    new, dci = sc.new_control(x, y, c, ci, steps=5, lr=0.1)     # ci - c + (x - y) / (K lr)
    np.testing.assert_allclose(new["w"], [0 - 0.1 + 0.5 / 0.5, 0.2 - 0 - 0.5 / 0.5], rtol=1e-6)
    np.testing.assert_allclose(dci["w"], new["w"] - ci["w"], rtol=1e-6)
    up = sc.update_tensors(x, y, dci)
    np.testing.assert_allclose(up["w"], [-0.5, 0.5])
    np.testing.assert_allclose(sc.correction(c, ci)["w"], [0.1, -0.2])


def test_trainer_adds_the_correction_and_skips_frozen_tensors():
    head = {"dense0.weight": np.zeros((2, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}
    x = np.array([[1.0, 0.0]], np.float32)
    y = np.array([0])
    cfg = TrainConfig(lr=0.1, momentum=0.0, weight_decay=0.0)
    plain = HeadTrainer(head, cfg)
    plain.step(x, y)
    corr = {"dense0.bias": np.array([1.0, -1.0], np.float32)}
    t = HeadTrainer(head, cfg, correction=corr, frozen={"dense0.weight"})
    t.step(x, y)
    np.testing.assert_allclose(t.params["dense0.bias"], plain.params["dense0.bias"] - 0.1 * corr["dense0.bias"],
                               rtol=1e-6)
    assert not t.params["dense0.weight"].any() and plain.params["dense0.weight"].any()


def test_control_store_survives_restart_and_refuses_corruption(tmp_path):
    shapes = {"w": (2,)}
    st = sc.ControlStore(tmp_path, "bundle-a")
    ci, why = st.load_or_reset(shapes)
    assert why is None and not ci["w"].any()
    st.save(d(0.25, -0.5))
    again, why = sc.ControlStore(tmp_path, "bundle-a").load_or_reset(shapes)
    assert why is None
    np.testing.assert_allclose(again["w"], [0.25, -0.5])
    _, why = sc.ControlStore(tmp_path, "bundle-b").load_or_reset(shapes)
    assert "not bundle-b" in why
    _, why = st.load_or_reset({"w": (3,)})
    assert "do not match" in why
    with np.load(st.path) as z:       # values changed under a valid file: the checksum catches it
        meta = z["meta"]
    np.savez(st.path.with_suffix(""), meta=meta, **{"ci/w": np.array([9.0, 9.0], np.float32)})
    zeros, why = st.load_or_reset(shapes)
    assert "checksum" in why and not zeros["w"].any()
    st.save(d(0.25, -0.5))
    raw = bytearray(st.path.read_bytes())
    at = bytes(raw).index(np.array([0.25, -0.5], np.float32).tobytes())   # flip a bit of cᵢ's own bytes
    raw[at] ^= 0x01
    st.path.write_bytes(bytes(raw))
    zeros, why = st.load_or_reset(shapes)
    assert why and not zeros["w"].any()
    st.path.write_bytes(b"garbage")
    _, why = st.load_or_reset(shapes)
    assert "unreadable" in why


def test_split_task_refuses_mismatched_control_variates():
    with pytest.raises(ValueError, match="cv.w shape"):
        sc.split_task({"w": np.ones(2, np.float32), "cv.w": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="control variate tensors"):
        sc.split_task({"w": np.ones(2, np.float32)})


def test_fedadam_bias_correction_first_step_is_eta_times_sign():
    s = make("fedadam", eta=0.1, beta1=0.9, beta2=0.99, tau=1e-9, bias_correction=True)
    new = s.aggregate_deltas(G, [(d(1.0, -2.0), 1, 0)])
    # m̂ = Δ, v̂ = Δ²: the first step is η·sign(Δ) (Kingma & Ba)
    np.testing.assert_allclose(new["w"], [1.1, 0.9], rtol=1e-6)
    st = s.to_state()
    assert st["t"] == 1


def test_fedadam_flower_mode_by_hand():
    s = make("fedadam", eta=0.1, beta1=0.9, beta2=0.99, tau=1e-9, flower=True)
    new = s.aggregate_deltas(G, [(d(1.0, -2.0), 1, 0)])
    m = 0.1 * np.array([1.0, -2.0])
    v = 0.01 * np.array([1.0, 4.0])
    eta_t = 0.1 * math.sqrt(1 - 0.99 ** 2) / (1 - 0.9 ** 2)     # flwr uses server_round + 1
    np.testing.assert_allclose(new["w"], 1 + eta_t * m / (np.sqrt(v) + 1e-9), rtol=1e-5)
    with pytest.raises(ValueError):
        make("fedadam", flower=True, bias_correction=True)


def test_engine_sends_scaffold_control_variate_and_accepts_its_updates(tmp_path):
    store = RoundStore(sqlite3.connect(tmp_path / "r.db"))
    head = {"dense0.weight": np.zeros((2, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}
    cfg = RunConfig(strategy="scaffold", rounds=1, clients=2, min_clients=2, min_samples=1)
    store.create_run("run-s", cfg.to_dict(), head)
    eng = RoundEngine("run-s", store, make("scaffold"))
    clients = [ClientInfo(f"d{i}", True, 50) for i in range(2)]
    tasks, _ = eng.step(100.0, clients)
    assert len(tasks) == 2 and set(tasks[0].head) == {"dense0.weight", "dense0.bias", "cv.dense0.weight",
                                                       "cv.dense0.bias"}
    assert tasks[0].body["scaffold"] is True
    bad = eng.on_update(101.0, "d0", 1, 0, 10, {k: np.ones_like(v) for k, v in head.items()}, {})
    assert not bad.accepted and "tensor names" in bad.reason
    for dev in ("d1",):
        ok = eng.on_update(101.0, dev, 1, 0, 10, {**{k: np.ones_like(v) for k, v in head.items()},
                                                  **{"cv." + k: np.ones_like(v) for k, v in head.items()}}, {})
        assert ok.accepted, ok.reason
