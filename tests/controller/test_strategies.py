"""Each strategy against a case small enough to compute by hand."""
import json

import numpy as np
import pytest

from controller.fl import aggregate as agg
from controller.fl.strategies import STRATEGIES, make

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
                               "multikrum", "fedbuff", "fedavgm", "scaffold"}
    with pytest.raises(KeyError, match="unknown strategy"):
        make("fedmagic")
    with pytest.raises(ValueError, match="bad parameters"):
        make("fedavg", nope=1)


# -- the Flower-style interface: configure / aggregate(results, failures) / state ------------

def test_configure_gives_each_client_the_base_plus_strategy_settings():
    cfgs = make("fedprox", mu=0.1).configure(3, ["a", "b"], {"steps": 20, "lr": 0.05})
    assert cfgs == {"a": {"steps": 20, "lr": 0.05, "prox_mu": 0.1, "round": 3},
                    "b": {"steps": 20, "lr": 0.05, "prox_mu": 0.1, "round": 3}}
    assert make("fedavg").configure(1, ["a"]) == {"a": {"round": 1}}


def test_aggregate_takes_fit_results_and_failures():
    from controller.fl.strategies import FitResult

    s = make("fedavg")
    res = [FitResult(d(1, 0), 30, 0, "a"), FitResult(d(3, 4), 10, 0, "b")]
    np.testing.assert_allclose(s.aggregate(G, res, failures=["c timed out"])["w"], [2.5, 2.0])
    assert s.aggregate(G, [], ["everyone failed"]) is None
    strict = make("fedavg")
    strict.accept_failures = False
    assert strict.aggregate(G, res, ["c timed out"]) is None
    np.testing.assert_allclose(strict.aggregate(G, res, [])["w"], [2.5, 2.0])


def test_accept_failures_is_a_strategy_param():
    from controller.fl.strategies import FitFailure

    strict = make("fedavg", accept_failures=False)
    assert strict.accept_failures is False and make("median").accept_failures is True
    assert strict.aggregate(G, [(d(1, 0), 1, 0)], [FitFailure("c", "no update by the deadline")]) is None
    with pytest.raises(ValueError, match="accept_failures"):
        make("median", accept_failures="sometimes")


def test_fedbuff_waits_for_k_usable_updates_and_drops_the_too_stale():
    s = make("fedbuff", eta=1.0, buffer_size=2, max_staleness=3)
    # one fresh + one 5 versions stale (dropped): only one usable of the two needed -> no model
    assert s.aggregate(G, [(d(1, 1), 10, 0), (d(9, 9), 10, 5)]) is None and s.last_dropped == [1]
    # fresh (w = 10) and 3 stale (w = 10 / sqrt(4) = 5): (10*3 + 5*0) / 15 = 2 ; (10*0 + 5*6)/15 = 2
    new = s.aggregate(G, [(d(3, 0), 10, 0), (d(0, 6), 10, 3), (d(100, 100), 10, 4)])
    np.testing.assert_allclose(new["w"], [1 + 2, 1 + 2])
    assert s.last_dropped == [2]


def test_fedadam_two_rounds_across_a_restart_by_hand():
    s = make("fedadam", eta=0.1, beta1=0.5, beta2=0.5, tau=0.1)
    h1 = s.aggregate(G, [(d(1.0, 0.0), 1, 0)])
    # round 1: m = 0.5, v = 0.5*0.01 + 0.5*1 = 0.505 ; second coordinate m = 0, v = 0.005
    np.testing.assert_allclose(h1["w"], [1 + 0.1 * 0.5 / (np.sqrt(0.505) + 0.1), 1.0], rtol=1e-6)
    state = json.loads(json.dumps(s.to_state()))        # through JSON, as the runner stores it
    s2 = STRATEGIES["fedadam"].from_state(state, eta=0.1, beta1=0.5, beta2=0.5, tau=0.1)
    h2 = s2.aggregate(h1, [(d(1.0, 0.0), 1, 0)])
    # round 2: m = 0.25 + 0.5 = 0.75, v = 0.2525 + 0.5 = 0.7525
    np.testing.assert_allclose(h2["w"], [h1["w"][0] + 0.1 * 0.75 / (np.sqrt(0.7525) + 0.1), 1.0], rtol=1e-5)


def test_server_optimizer_applies_to_a_precomputed_mean_too():
    # the DP path hands the strategy a private mean and calls apply(): FedAdam still steps
    s = make("fedadam", eta=0.1, beta1=0.0, beta2=0.0, tau=1e-3)
    new = s.apply(G, d(2.0, -2.0))
    # beta1 = beta2 = 0: m = d, v = d^2 -> step = eta * d / (|d| + tau)
    np.testing.assert_allclose(new["w"], 1 + 0.1 * np.array([2, -2]) / (2 + 1e-3), rtol=1e-6)
    assert s.m["w"].tolist() == [2.0, -2.0]


def test_krum_falls_back_to_median_with_too_few_updates():
    s = make("krum", f=1)
    new = s.aggregate(G, [(d(0, 0), 1, 0), (d(2, 4), 1, 0), (d(100, 100), 1, 0)])
    np.testing.assert_allclose(new["w"], [1 + 2, 1 + 4])


def test_aggregation_refuses_mismatched_updates_instead_of_broadcasting():
    with pytest.raises(ValueError, match="update 1 has tensors"):
        agg.weighted_average([d(1, 2), {"w": np.ones((3, 2), np.float32)}], [1, 1])
    with pytest.raises(ValueError, match="update 1"):
        agg.coordinate_median([d(1, 2), {"x": np.ones(2, np.float32)}])
    with pytest.raises(ValueError, match="not all zero"):
        agg.weighted_average([d(1, 2)], [0])
    with pytest.raises(ValueError, match="staleness"):
        agg.staleness_weight(-1)
    assert agg.staleness_weight(3) == 0.5 and agg.staleness_weight(3, "linear") == 0.25
    with pytest.raises(ValueError):
        make("fedavg", staleness="cubic")
    with pytest.raises(ValueError):
        make("trimmed_mean", beta=0.5)


@pytest.mark.parametrize("update,kw,reason", [
    ({"w": np.array([0.1, 0.2], np.float32)}, {}, None),
    ({"v": np.array([0.1, 0.2], np.float32)}, {}, "do not match"),
    ({"w": np.array([0.1, 0.2, 0.3], np.float32)}, {}, "shape [3] != [2]"),
    ({"w": np.array([1, 2], np.int32)}, {}, "not floating point"),
    ({"w": np.array([np.nan, 0], np.float32)}, {}, "NaN or inf"),
    ({"w": np.array([3.0, 4.0], np.float32)}, {"max_norm": 4.9}, "norm 5 exceeds"),
    ({"w": np.array([0.1, 0.2], np.float32)}, {"base_version": 2, "current_version": 7, "max_staleness": 4},
     "stale: 5 versions behind"),
    ({"w": np.array([0.1, 0.2], np.float32)}, {"base_version": 8, "current_version": 7}, "ahead"),
    ({"w": [0.1, 0.2]}, {}, "not an array"),
])
def test_validate_update(update, kw, reason):
    from controller.fl.strategies import UpdateRejected, validate_update

    if reason is None:
        assert validate_update(update, G, max_norm=1.0, **kw) == pytest.approx(np.sqrt(0.05))
        return
    with pytest.raises(UpdateRejected) as e:
        validate_update(update, G, **kw)
    assert reason in e.value.reason
