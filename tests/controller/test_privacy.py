import math

import numpy as np
import pytest

from controller.privacy import DPConfig, clip_update, epsilon, private_mean


def test_epsilon_matches_the_closed_form_optimum():
    # single Gaussian mechanism, z = 1, delta = 1e-5: min_a a/2 + ln(1e5)/(a-1) = 1/2 + sqrt(2 ln 1e5)
    eps, order = epsilon(1.0, 1, 1e-5, orders=[1 + i / 100 for i in range(1, 5000)])
    assert eps == pytest.approx(0.5 + math.sqrt(2 * math.log(1e5)), rel=1e-4)
    # T rounds with noise z equal one round with noise z / sqrt(T)
    a, _ = epsilon(2.0, 16, 1e-5)
    b, _ = epsilon(0.5, 1, 1e-5)
    assert a == pytest.approx(b)
    assert epsilon(0.0, 1, 1e-5)[0] == math.inf


def test_clipping_and_noise_scale():
    u = {"w": np.array([3.0, 4.0], np.float32)}
    np.testing.assert_allclose(clip_update(u, 1.0)["w"], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_allclose(clip_update(u, 10.0)["w"], [3, 4])
    rng = np.random.default_rng(0)
    ups = [{"w": np.zeros(20000, np.float32)} for _ in range(10)]
    out = private_mean(ups, DPConfig(clip=1.0, noise=2.0), rng)
    assert np.std(out["w"]) == pytest.approx(2.0 * 1.0 / 10, rel=0.03)


def test_bad_dp_config():
    with pytest.raises(ValueError):
        DPConfig.from_dict({"clip": 0})
    assert DPConfig.from_dict(None) is None
