"""DP: clipping, noise scale, and the RDP accountant against Google's dp-accounting.

The reference numbers were computed once with dp-accounting 0.6.0:
``RdpAccountant(orders=range(2, 257))``, composing ``GaussianDpEvent(z)`` (q = 1) or
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` ``steps`` times, then
``get_epsilon_and_optimal_order(delta)``; and ``_compute_rdp_poisson_subsampled_gaussian``.
"""
import math

import numpy as np
import pytest

from controller.fl.privacy import (DPConfig, DPFixedClipping, PrivacyAccountant, clip_update, epsilon,
                                sampled_gaussian_rdp)
from controller.fl.strategies import make

INT_ORDERS = [float(a) for a in range(2, 257)]

# (q, z, steps, delta) -> (epsilon, optimal order), from dp-accounting 0.6.0
DP_ACCOUNTING = [
    ((1.0, 1.0, 1, 1e-5), (4.752728336819822, 5)),
    ((1.0, 2.0, 16, 1e-5), (10.801691480042894, 3)),
    ((0.01, 4.0, 10000, 1e-5), (1.0354900660362436, 17)),   # Abadi et al.'s MNIST setting
    ((0.1, 1.1, 100, 1e-5), (6.745046581290989, 4)),
    ((0.05, 0.8, 50, 1e-6), (6.554935745032103, 4)),
    ((0.25, 2.0, 30, 1e-5), (3.8044546644021233, 6)),
]

# (q, z) -> RDP at orders 2, 8, 32 (one step), from dp-accounting 0.6.0
RDP_REF = [
    ((0.01, 4.0), (6.449425094202615e-06, 2.5899123012412577e-05, 0.00010526360659077987)),
    ((0.1, 1.1), (0.012769949946862126, 0.7121744952920218, 10.846278464459463)),
    ((0.25, 2.0), (0.01759586923784058, 0.10770969505360216, 2.570327178682576)),
]


@pytest.mark.parametrize("case,expected", DP_ACCOUNTING)
def test_epsilon_matches_dp_accounting(case, expected):
    q, z, steps, delta = case
    eps, order = epsilon(z, steps, delta, orders=INT_ORDERS, q=q)
    assert eps == pytest.approx(expected[0], rel=1e-9)
    assert order == expected[1]


@pytest.mark.parametrize("qz,expected", RDP_REF)
def test_sampled_gaussian_rdp_matches_dp_accounting(qz, expected):
    for alpha, want in zip((2, 8, 32), expected):
        assert sampled_gaussian_rdp(*qz, alpha) == pytest.approx(want, rel=1e-9)


def test_rdp_limits_and_composition():
    # q = 1 is the plain Gaussian mechanism; q = 0 leaks nothing
    assert sampled_gaussian_rdp(1.0, 2.0, 3) == pytest.approx(3 / 8)
    assert sampled_gaussian_rdp(0.0, 2.0, 3) == 0.0
    # T rounds with noise z equal one round with noise z / sqrt(T) (RDP adds up)
    assert epsilon(2.0, 16, 1e-5)[0] == pytest.approx(epsilon(0.5, 1, 1e-5)[0])
    # sampling amplifies: fewer participants per round, smaller epsilon
    assert epsilon(1.0, 10, 1e-5, q=0.1)[0] < epsilon(1.0, 10, 1e-5)[0]
    assert epsilon(0.0, 1, 1e-5)[0] == math.inf
    assert epsilon(1.0, 0, 1e-5)[0] == 0.0
    with pytest.raises(ValueError):
        sampled_gaussian_rdp(0.5, 1.0, 2.5)   # the sampled bound here is for integer orders


def test_accountant_reports_epsilon_per_round_and_resumes():
    cfg = DPConfig(clip=1.0, noise=1.0, delta=1e-5)
    acc = PrivacyAccountant(cfg)
    spent = [acc.step() for _ in range(3)]
    assert [s.rounds for s in spent] == [1, 2, 3]
    assert spent[0].epsilon < spent[1].epsilon < spent[2].epsilon
    assert spent[0].epsilon == pytest.approx(epsilon(1.0, 1, 1e-5)[0])
    again = PrivacyAccountant.from_state(cfg, acc.to_state())
    assert again.spent() == spent[2]


def test_clipping_and_noise_scale():
    u = {"w": np.array([3.0, 4.0], np.float32)}
    np.testing.assert_allclose(clip_update(u, 1.0)["w"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(clip_update(u, 10.0)["w"], [3, 4])
    np.testing.assert_array_equal(u["w"], [3, 4])     # input untouched
    # clipping is over the whole update, not per tensor: norm of (3, 4, 12) is 13
    two = {"a": np.array([3.0, 4.0], np.float32), "b": np.array([12.0], np.float32)}
    c = clip_update(two, 1.3)
    np.testing.assert_allclose(np.concatenate([c["a"], c["b"]]), [0.3, 0.4, 1.2], rtol=1e-6)
    # FedAvg over equal sample counts is the uniform mean: noise N(0, (z clip / m)^2) on it
    ups = [({"w": np.zeros(20000, np.float32)}, 1, 0) for _ in range(10)]
    out = DPFixedClipping(make("fedavg"), DPConfig(clip=1.0, noise=2.0)).aggregate({"w": np.zeros(20000)}, ups)
    assert np.std(out["w"]) == pytest.approx(2.0 * 1.0 / 10, rel=0.03)
    # noise-free: the uniform mean of clipped updates
    out = DPFixedClipping(make("fedavg"), DPConfig(clip=1.0, noise=0.0)).aggregate(
        {"w": np.zeros(2)}, [({"w": np.array([3.0, 4.0])}, 1, 0), ({"w": np.array([0.0, 0.1])}, 1, 0)])
    np.testing.assert_allclose(out["w"], [0.3, 0.45], rtol=1e-6)


def test_bad_dp_config():
    with pytest.raises(ValueError):
        DPConfig.from_dict({"clip": 0})
    with pytest.raises(ValueError, match="unknown dp settings: nosie"):
        DPConfig.from_dict({"nosie": 1.0})
    with pytest.raises(ValueError, match="bad dp settings"):
        DPConfig.from_dict({"clip": "lots"})
    with pytest.raises(ValueError):
        DPConfig(sample_rate=0.0)
    assert DPConfig.from_dict(None) is None
    assert DPConfig.from_dict({"noise": "0.5"}) == DPConfig(noise=0.5)


# -- DP as a wrapper around the run's strategy (clip -> inner aggregate -> noise) ---------------

G = {"w": np.array([1.0, 1.0], np.float32)}
UPS = [({"w": np.array(v, np.float32)}, n, 0) for v, n in
       (([3.0, 4.0], 10), ([4.0, 3.0], 30), ([-6.0, 8.0], 20), ([0.1, 0.2], 5), ([2.0, -2.0], 15))]


@pytest.mark.parametrize("name,params", [("median", {}), ("trimmed_mean", {"beta": 0.2}),
                                         ("fedadam", {"eta": 0.1}), ("fedavg", {})])
def test_dp_without_noise_is_the_inner_strategy_on_clipped_updates(name, params):
    dp = DPFixedClipping(make(name, **params), DPConfig(clip=1.0, noise=0.0))
    want = make(name, **params).aggregate(G, [(clip_update(u, 1.0), n, s) for u, n, s in UPS])
    np.testing.assert_array_equal(dp.aggregate(G, UPS)["w"], want["w"])
    # ... which is not what the strategy makes of the unclipped updates
    assert not np.allclose(make(name, **params).aggregate(G, UPS)["w"], want["w"])


def test_dp_noise_is_calibrated_to_the_inner_aggregate_and_shifts_it():
    zeros = [({"w": np.zeros(20000, np.float32)}, 1, 0) for _ in range(10)]
    out = DPFixedClipping(make("median"), DPConfig(clip=1.0, noise=2.0)).aggregate({"w": np.zeros(20000)}, zeros)
    assert np.std(out["w"]) == pytest.approx(2.0 * 1.0 / 10, rel=0.03)
    # sample-weighted FedAvg: one device holding 90 % of the weight moves the mean by 0.9 clip
    skewed = [(u, n, 0) for (u, _, _), n in zip(zeros[:2], (90, 10))]
    out = DPFixedClipping(make("fedavg"), DPConfig(clip=1.0, noise=2.0)).aggregate({"w": np.zeros(20000)}, skewed)
    assert np.std(out["w"]) == pytest.approx(2.0 * 0.9, rel=0.03)


def test_dp_noise_comes_from_os_entropy_not_a_seed():
    a, b = (DPFixedClipping(make("fedavg"), DPConfig(clip=1.0, noise=1.0)).aggregate(G, UPS) for _ in range(2))
    assert not np.allclose(a["w"], b["w"])


def test_dp_wrapper_configures_clients_to_clip_and_accounts_across_a_restart():
    import json

    from controller.fl.strategies import STRATEGIES

    dp = DPFixedClipping(make("fedprox", mu=0.1), DPConfig(clip=0.5, noise=1.0))
    assert dp.configure(2, ["a"], {"steps": 20}) == {"a": {"steps": 20, "prox_mu": 0.1, "round": 2,
                                                          "dp": {"clip": 0.5}}}
    dp.aggregate(G, UPS)
    state = json.loads(json.dumps(dp.to_state()))
    again = DPFixedClipping(STRATEGIES["fedprox"].from_state(state, mu=0.1), DPConfig(clip=0.5, noise=1.0))
    again.load_state(state)
    again.aggregate(G, UPS)
    assert again.to_state()["dp_rounds"] == 2
    assert again.to_state()["dp_epsilon"] == pytest.approx(epsilon(1.0, 2, 1e-5)[0], abs=1e-4)
    strict = DPFixedClipping(make("fedavg", accept_failures=False), DPConfig())
    assert strict.aggregate(G, UPS, ["e timed out"]) is None
