import pytest

from agent.offload.policy import LOCAL, LOCAL_LOW, OFFLOAD, OffloadPolicy, RttEstimator, decide
from controller.offload.tuning import TuningRule, adjust_threshold


def rtt(*samples):
    r = RttEstimator()
    for s in samples:
        r.observe(s)
    return r


def test_confident_answers_stay_local():
    p = OffloadPolicy(enabled=True, threshold=0.8)
    assert decide(0.95, 2.0, p, rtt(10), True).path == LOCAL


def test_low_confidence_offloads_when_it_fits():
    p = OffloadPolicy(enabled=True, threshold=0.8, deadline_ms=100)
    d = decide(0.5, 2.0, p, rtt(10, 10, 10), True)
    assert d.path == OFFLOAD and d.expected_remote_ms == pytest.approx(10 + 2 * (0.75 * 0.75 * 5))


def test_low_confidence_stays_local_when_remote_would_miss_the_deadline_or_link_down():
    p = OffloadPolicy(enabled=True, threshold=0.8, deadline_ms=50)
    assert decide(0.5, 2.0, p, rtt(80), True).path == LOCAL_LOW
    assert decide(0.5, 2.0, p, rtt(10), False).path == LOCAL_LOW
    assert decide(0.5, 2.0, p, rtt(10), True, queue_hint_ms=100).path == LOCAL_LOW
    assert decide(0.5, 2.0, OffloadPolicy(enabled=False), rtt(1), True).path == LOCAL


def test_rtt_estimator_follows_rfc6298():
    r = rtt(100)
    assert (r.srtt, r.rttvar) == (100, 50)
    r.observe(60)
    assert r.rttvar == pytest.approx(0.75 * 50 + 0.25 * 40)
    assert r.srtt == pytest.approx(0.875 * 100 + 0.125 * 60)
    r.timeout_penalty(200)
    assert r.srtt > 95


def test_policy_validation():
    with pytest.raises(ValueError):
        OffloadPolicy(threshold=1.5)
    with pytest.raises(ValueError):
        OffloadPolicy(mode="teleport")


@pytest.mark.parametrize("util,timeouts,disagree,expect,why", [
    (0.95, 0.0, 0.2, 0.78, "offload less"),
    (0.3, 0.0, 0.2, 0.82, "offload more"),
    (0.3, 0.0, 0.0, 0.80, "nothing to gain"),
    (0.7, 0.0, 0.2, 0.80, "within"),
    (0.3, 0.2, 0.2, 0.78, "timeouts"),
])
def test_feedback_rule(util, timeouts, disagree, expect, why):
    t, reason = adjust_threshold(0.80, util, timeouts, disagree)
    assert t == pytest.approx(expect) and why in reason


def test_feedback_rule_is_clamped():
    assert adjust_threshold(0.99, 0.1, 0.0, 0.5, TuningRule(hi=0.99))[0] == 0.99
    assert adjust_threshold(0.0, 0.99, 0.0, 0.5)[0] == 0.0
