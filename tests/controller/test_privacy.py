"""DP: clipping, noise scale, and the RDP accountant against Google's dp-accounting.

The reference numbers were computed once with dp-accounting 0.6.0:
``RdpAccountant(orders=range(2, 257))``, composing ``GaussianDpEvent(z)`` (q = 1) or
``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` ``steps`` times, then
``get_epsilon_and_optimal_order(delta)``; and ``_compute_rdp_poisson_subsampled_gaussian``.
"""
import math

import numpy as np
import pytest

from controller.fl.privacy import (DPConfig, PrivacyAccountant, clip_update, epsilon, private_mean,
                                sampled_gaussian_rdp)

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
    rng = np.random.default_rng(0)
    ups = [{"w": np.zeros(20000, np.float32)} for _ in range(10)]
    out = private_mean(ups, DPConfig(clip=1.0, noise=2.0), rng)
    assert np.std(out["w"]) == pytest.approx(2.0 * 1.0 / 10, rel=0.03)
    # noise-free: the uniform mean of clipped updates
    out = private_mean([{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 0.1])}], DPConfig(clip=1.0, noise=0.0), rng)
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
