"""Each strategy against a case small enough to compute by hand."""
import numpy as np
import pytest

from controller import aggregate as agg
from controller.strategies import STRATEGIES, make

G = {"w": np.array([1.0, 1.0], np.float32)}


def d(*v):
    return {"w": np.array(v, np.float32)}


def test_fedavg_is_sample_weighted():
    new = make("fedavg").aggregate_deltas(G, [(d(1, 0), 30, 0), (d(3, 4), 10, 0)])
    np.testing.assert_allclose(new["w"], [1 + (30 * 1 + 10 * 3) / 40, 1 + (10 * 4) / 40])


def test_fedavg_discounts_stale_updates_by_1_over_sqrt_1_plus_s():
    new = make("fedavg").aggregate_deltas(G, [(d(1, 1), 10, 0), (d(-1, -1), 10, 3)])
    w0, w1 = 1.0, 1 / np.sqrt(4)  # = 0.5
    np.testing.assert_allclose(new["w"], 1 + (w0 - w1) / (w0 + w1))   # 1 + 1/3


def test_fedprox_aggregates_like_fedavg_and_tells_clients_mu():
    s = make("fedprox", mu=0.5)
    assert s.task_config == {"prox_mu": 0.5}
    np.testing.assert_allclose(s.aggregate_deltas(G, [(d(2, 2), 1, 0)])["w"], [3, 3])


def test_fedadam_first_step_by_hand():
    s = make("fedadam", eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    new = s.aggregate_deltas(G, [(d(1.0, -2.0), 1, 0)])
    m = 0.1 * np.array([1.0, -2.0])
    v = 0.99 * 1e-6 + 0.01 * np.array([1.0, 4.0])
    np.testing.assert_allclose(new["w"], 1 + 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
    st = s.state()
    s2 = make("fedadam", eta=0.1)
    s2.load_state(st)
    np.testing.assert_allclose(s2.m["w"], m, rtol=1e-6)


def test_fedyogi_second_moment_by_hand():
    s = make("fedyogi", eta=0.1, beta1=0.0, beta2=0.9, tau=0.1)
    new = s.aggregate_deltas(G, [(d(1.0, 0.0), 1, 0)])
    v0 = np.array([0.01, 0.01])
    d2 = np.array([1.0, 0.0])
    v = v0 - 0.1 * d2 * np.sign(v0 - d2)        # [0.11, 0.01]
    np.testing.assert_allclose(new["w"], 1 + 0.1 * np.array([1.0, 0.0]) / (np.sqrt(v) + 0.1), rtol=1e-5)


def test_median_and_trimmed_mean_shrug_off_an_outlier():
    ups = [(d(1, 1), 1, 0), (d(2, 2), 1, 0), (d(3, 3), 1, 0), (d(1000, -1000), 1, 0), (d(4, 4), 1, 0)]
    np.testing.assert_allclose(make("median").aggregate_deltas(G, ups)["w"], [1 + 3, 1 + 2])
    # trim 1 of 5 each side: per coordinate keep the middle three
    np.testing.assert_allclose(make("trimmed_mean", beta=0.2).aggregate_deltas(G, ups)["w"],
                               [1 + (2 + 3 + 4) / 3, 1 + (1 + 2 + 3) / 3])
    with pytest.raises(ValueError):
        agg.trimmed_mean([u for u, _, _ in ups], 0.5)


def test_krum_scores_and_choice_by_hand():
    ups = [d(0, 0), d(1, 0), d(0, 1), d(10, 10)]
    # f=1 → each score sums the n-f-2 = 1 nearest squared distance
    np.testing.assert_allclose(agg.krum_scores(ups, f=1), [1, 1, 1, 181])
    s = make("krum", f=1)
    new = s.aggregate_deltas(G, [(u, 1, 0) for u in ups])
    assert s.last_chosen == [0]
    np.testing.assert_allclose(new["w"], [1, 1])
    mk = make("multikrum", f=1, m=3)
    new = mk.aggregate_deltas(G, [(u, 1, 0) for u in ups])
    np.testing.assert_allclose(new["w"], [1 + 1 / 3, 1 + 1 / 3])
    assert 3 not in mk.last_chosen


def test_fedbuff_server_lr():
    new = make("fedbuff", eta=0.5).aggregate_deltas(G, [(d(2, 2), 1, 0), (d(2, 2), 1, 8)])
    np.testing.assert_allclose(new["w"], [2, 2])


def test_inputs_are_never_mutated_and_fast_average_matches():
    rng = np.random.default_rng(0)
    ups = [{"a": rng.normal(size=(20, 5)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
           for _ in range(7)]
    copies = [{k: v.copy() for k, v in u.items()} for u in ups]
    w = rng.integers(1, 50, 7).astype(float)
    a, b = agg.weighted_average(ups, w), agg.fast_weighted_average(ups, w)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-6)
    for u, c in zip(ups, copies):
        for k in u:
            np.testing.assert_array_equal(u[k], c[k])


def test_registry_of_strategies():
    assert set(STRATEGIES) == {"fedavg", "fedprox", "fedadam", "fedyogi", "median", "trimmed_mean", "krum",
                               "multikrum", "fedbuff"}
    with pytest.raises(KeyError, match="unknown strategy"):
        make("fedmagic")
    with pytest.raises(ValueError, match="bad parameters"):
        make("fedavg", nope=1)
