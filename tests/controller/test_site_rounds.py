"""Site-level aggregation (issue 19): the maths against hand-computed cases and flat aggregation,
which strategies may be pre-aggregated, and the engine's counting of boards (pure; a real SQLite)."""

import numpy as np
import pytest

from controller.db import connect
from controller.fl import strategies as st
from controller.fl.engine import RoundEngine, RunConfig
from controller.fl.privacy import DPConfig, DPFixedClipping
from controller.fl.selection import ClientInfo
from controller.fl.store import RoundStore
from controller.fl.strategies import FitResult
from protocol.sitefl import BoardUpdate, SiteRound, combine, site_deadline

G = {"dense0.weight": np.zeros((2, 2), np.float32), "dense0.bias": np.zeros(2, np.float32)}


def d(w, b):
    return {"dense0.weight": np.asarray(w, np.float32).reshape(2, 2), "dense0.bias": np.asarray(b, np.float32)}


# three boards: a and b at site S, c direct
A, B, C = d([1, 2, 3, 4], [1, -1]), d([3, 0, -1, 2], [0, 2]), d([0, 0, 0, 8], [4, 4])
N = {"a": 10, "b": 30, "c": 20}


def site_result(weighting, *boards):
    ups = [BoardUpdate(x, N[x], {"a": A, "b": B, "c": C}[x]) for x in boards]
    agg = combine(ups, weighting)
    return FitResult(agg.mean, agg.num_samples, 0, "relay-s", agg.contributors)


def test_site_mean_by_hand_and_equal_to_flat_fedavg():
    agg = combine([BoardUpdate("a", 10, A), BoardUpdate("b", 30, B)], "samples")
    # (10·[1,2,3,4] + 30·[3,0,-1,2]) / 40 = [2.5, 0.5, 0, 2.5]; bias (10·[1,-1] + 30·[0,2]) / 40
    np.testing.assert_allclose(agg.mean["dense0.weight"].ravel(), [2.5, 0.5, 0.0, 2.5], atol=1e-7)
    np.testing.assert_allclose(agg.mean["dense0.bias"], [0.25, 1.25], atol=1e-7)
    assert agg.num_samples == 40 and agg.contributors == {"a": 10, "b": 30}
    flat = st.FedAvg().aggregate_deltas(G, [FitResult(A, 10, 0, "a"), FitResult(B, 30, 0, "b"),
                                            FitResult(C, 20, 0, "c")])
    site = st.FedAvg().aggregate_deltas(G, [site_result("samples", "a", "b"), FitResult(C, 20, 0, "c")])
    # by hand: (10·A + 30·B + 20·C) / 60, bias = (10 + 0 + 80, -10 + 60 + 80) / 60
    np.testing.assert_allclose(site["dense0.bias"], [1.5, 130 / 60], atol=1e-6)
    for k in G:
        assert np.max(np.abs(site[k] - flat[k])) <= 1e-6


@pytest.mark.parametrize("name,params", [("fedavgm", {"eta": 0.5, "beta": 0.9}), ("fedadam", {"eta": 0.1}),
                                         ("fedyogi", {}), ("fedprox", {"mu": 0.1})])
def test_fedavg_family_site_equals_flat_over_rounds(name, params):
    """Server momentum / adaptivity act on the aggregate: over 3 rounds the state stays equal too."""
    flat, site = st.make(name, **params), st.make(name, **params)
    assert flat.site_weighting == "samples"
    hf, hs = dict(G), dict(G)
    for _ in range(3):
        hf = flat.aggregate_deltas(hf, [FitResult(A, 10, 0, "a"), FitResult(B, 30, 0, "b"), FitResult(C, 20, 0, "c")])
        hs = site.aggregate_deltas(hs, [site_result("samples", "a", "b"), FitResult(C, 20, 0, "c")])
    for k in G:
        assert np.max(np.abs(hf[k] - hs[k])) <= 1e-6


def test_scaffold_deltas_sum_uniformly_by_board_count():
    """Δy and Δc are uniform means over boards: a site's mean weighs as many boards as it holds,
    and |S|/N counts boards (the control variate moves the same as flat)."""
    cv = {"a": d([1, 1, 1, 1], [0, 0]), "b": d([0, 2, 0, 2], [1, 1]), "c": d([4, 0, 0, 0], [0, 3])}
    full = {x: {**u, **{st.CV + k: v for k, v in cv[x].items()}} for x, u in (("a", A), ("b", B), ("c", C))}
    flat, site = st.Scaffold(num_clients=4), st.Scaffold(num_clients=4)
    assert site.site_weighting == "uniform"
    hf = flat.aggregate_deltas(G, [FitResult(full[x], N[x], 0, x) for x in "abc"])
    agg = combine([BoardUpdate(x, N[x], full[x]) for x in "ab"], "uniform")
    hs = site.aggregate_deltas(G, [FitResult(agg.mean, agg.num_samples, 0, "relay", agg.contributors),
                                   FitResult(full["c"], 20, 0, "c")])
    np.testing.assert_allclose(hs["dense0.bias"], (A["dense0.bias"] + B["dense0.bias"] + C["dense0.bias"]) / 3,
                               atol=1e-6)
    for k in G:
        assert np.max(np.abs(hf[k] - hs[k])) <= 1e-6
        assert np.max(np.abs(flat.c[k] - site.c[k])) <= 1e-6   # c += 3/4 · mean(Δc)
    assert site.seen == {"a", "b", "c"}


@pytest.mark.parametrize("name", ["median", "trimmed_mean", "krum", "multikrum", "fedbuff"])
def test_robust_and_async_strategies_cannot_be_pre_aggregated(name):
    assert st.make(name).site_weighting is None


def test_dp_sensitivity_counts_boards_not_sites():
    """Noise is scaled by the largest *board's* weight share: the same for flat and site results."""
    flat = [FitResult(A, 10, 0, "a"), FitResult(B, 30, 0, "b"), FitResult(C, 20, 0, "c")]
    site = [site_result("samples", "a", "b"), FitResult(C, 20, 0, "c")]
    assert st.FedAvg().dp_sensitivity(site) == pytest.approx(st.FedAvg().dp_sensitivity(flat)) == 0.5
    assert st.Scaffold().dp_sensitivity(site) == pytest.approx(1 / 3)
    dp = DPFixedClipping(st.FedAvg(), DPConfig(clip=1.0, noise=0.0))
    assert dp.site_weighting == "samples"
    assert DPFixedClipping(st.Median(), DPConfig()).site_weighting is None


def test_combine_refuses_what_it_cannot_sum():
    with pytest.raises(ValueError, match="twice"):
        combine([BoardUpdate("a", 1, A), BoardUpdate("a", 1, A)], "samples")
    with pytest.raises(ValueError, match="tensors differ"):
        combine([BoardUpdate("a", 1, A), BoardUpdate("b", 1, {"dense0.bias": A["dense0.bias"]})], "samples")
    with pytest.raises(ValueError, match="weighting"):
        combine([BoardUpdate("a", 1, A)], "median")


def test_site_round_state_machine():
    r = SiteRound("r1", 1, 0, deadline=100.0, seen_at=0.0, weighting="samples")
    for x in ("a", "b", "x"):
        assert r.tasked_board(x, 0.0)
    assert not r.tasked_board("a", 1.0)
    assert site_deadline(100.0, 0.0) == 90.0 and site_deadline(10.0, 5.0) == 8.0   # 10 %, at least 2 s
    assert r.accepts("a", {"encoding": "raw", "base_version": 0}) == "hold"
    r.updates["a"] = BoardUpdate("a", 10, A)
    assert r.accepts("a", {"encoding": "raw", "base_version": 0}) == "duplicate"
    assert r.accepts("b", {"encoding": "raw", "base_version": 3}) == "forward"   # not the round's base
    assert not r.due(50.0, local={"a", "b"})          # b (at this site) still training
    assert r.due(50.0, local={"a"})                   # x and b elsewhere: everyone local answered
    assert r.tasked_board("y", 49.5) and not r.due(50.0, local={"a"})   # a task just came: settle first
    assert r.due(90.0, local={"a", "b"})              # the site deadline: b is a dropout
    r.updates["b"] = BoardUpdate("b", 30, B)
    agg = r.build()
    assert agg.contributors == {"a": 10, "b": 30} and r.state == "sent"
    assert r.accepts("x", {"encoding": "raw", "base_version": 0}) == "forward"   # late for the site
    assert r.on_ack({"accepted": False, "reason": "already counted", "exclude": ["b"]}) == "rebuild"
    assert r.build().contributors == {"a": 10}
    assert r.on_ack({"accepted": False, "reason": "late"}) == "forward" and r.state == "forward"
    assert SiteRound("r1", 1, 0, 100.0, 0.0, None).accepts("a", {"encoding": "raw", "base_version": 0}) == "forward"


# -- the engine: boards counted once, quorum by boards, per-site records ----------------------

@pytest.fixture
def store(tmp_path):
    return RoundStore(connect(str(tmp_path / "rounds.db")))


def run(store, strategy="fedavg", **cfg):
    cfg = {"rounds": 1, "clients": 4, "min_clients": 3, "deadline_s": 10, **cfg}
    store.create_run("r1", RunConfig(strategy=strategy, **cfg).to_dict(), G)
    from controller.fl.runner import strategy_for

    eng = RoundEngine("r1", store, strategy_for(RunConfig.from_dict(store.run("r1").config)))
    tasks, _ = eng.step(0.0, [ClientInfo(x, True, 100) for x in "abcd"])
    for t in tasks:
        eng.task_sent(t)
    return eng, tasks


def site_up(eng, now, boards, relay="relay-s", site="S", **kw):
    agg = combine([BoardUpdate(x, N.get(x, 5), {"a": A, "b": B, "c": C}.get(x, A)) for x in boards], "samples")
    return eng.on_site_update(now, relay, 1, 0, site, kw.get("weighting", "samples"), agg.contributors, agg.mean,
                              {"bytes": 99}, sent_ts=kw.get("sent_ts"))


def test_site_update_counts_each_board_once_and_equals_flat(store):
    eng, tasks = run(store)
    assert {t.body.get("site_agg") for t in tasks} == {"samples"}
    v = site_up(eng, 1.0, ["a", "b"])
    assert v.accepted and v.boards == ("a", "b")
    assert site_up(eng, 1.5, ["a", "b"]).duplicate                          # the relay's resend
    dup = eng.on_update(2.0, "a", 1, 0, 10, A, {})                          # a's own update, after its site's
    assert dup.accepted and dup.duplicate                                   # counted once: answered, not added
    assert eng.on_update(2.5, "c", 1, 0, 20, C, {"bytes": 50}).accepted
    _, outs = eng.step(11.0, [ClientInfo(x, True, 100) for x in "abcd"])
    assert outs[0].status == "aggregated"
    m = outs[0].metrics
    assert m["received"] == 3 and m["samples"] == 60 and m["uplink_bytes"] == 149
    assert m["sites"] == {"S": {"relay": "relay-s", "boards": ["a", "b"], "samples": 40, "bytes": 99}}
    assert [f["device"] for f in m["failures"]] == ["d"]
    flat = st.FedAvg().aggregate_deltas(G, [FitResult(A, 10, 0, "a"), FitResult(B, 30, 0, "b"),
                                            FitResult(C, 20, 0, "c")])
    head = store.run("r1").head
    assert all(np.max(np.abs(head[k] - flat[k])) <= 1e-6 for k in G)


def test_site_update_with_boards_already_counted_is_refused_naming_them(store):
    eng, _ = run(store)
    assert eng.on_update(1.0, "b", 1, 0, 30, B, {}).accepted               # b direct first
    v = site_up(eng, 2.0, ["a", "b"])
    assert not v.accepted and v.exclude == ("b",) and "b" in v.reason
    assert store.update_row("r1", 1, "a") is None                           # nothing stored
    assert site_up(eng, 2.5, ["a"]).accepted                                # sent again without b
    other = site_up(eng, 3.0, ["a", "c"], relay="relay-t", site="T")        # a moved to site T mid-round
    assert not other.accepted and other.exclude == ("a",)


def test_quorum_counts_boards_not_messages(store):
    eng, _ = run(store, min_clients=3)
    assert site_up(eng, 1.0, ["a", "b", "c"]).accepted                      # one message, three boards
    _, outs = eng.step(11.0, [ClientInfo(x, True, 100) for x in "abcd"])
    assert outs[0].status == "aggregated" and outs[0].metrics["received"] == 3


def test_quorum_fails_by_boards_even_with_a_site_update(store):
    eng, _ = run(store, min_clients=3)
    assert site_up(eng, 1.0, ["a", "b"]).accepted
    _, outs = eng.step(11.0, [ClientInfo(x, True, 100) for x in "abcd"])
    assert outs[0].status == "failed" and "2 of 3" in outs[0].metrics["reason"]


@pytest.mark.parametrize("case,why", [
    ("late", "late"), ("base", "base version"), ("stray", "no task"), ("weighting", "weighting"),
    ("relay_is_board", "relay"), ("norm", "norm")])
def test_site_update_refusals_say_why_and_store_nothing(store, case, why):
    eng, _ = run(store, max_update_norm=100.0)
    agg = combine([BoardUpdate("a", 10, A)], "samples")
    args = dict(now=1.0, relay_id="relay-s", round_no=1, base_version=0, site="S", weighting="samples",
                contributors={"a": 10}, mean=agg.mean, meta={})
    if case == "late":
        args["now"] = 10.5
    elif case == "base":
        args["base_version"] = 2
    elif case == "stray":
        args["contributors"] = {"a": 5, "zz": 5}
    elif case == "weighting":
        args["weighting"] = "uniform"
    elif case == "relay_is_board":
        args["relay_id"] = "b"
    else:
        args["mean"] = {k: v * 1e4 for k, v in agg.mean.items()}
    v = eng.on_site_update(**args)
    assert not v.accepted and why in v.reason
    assert store.updates("r1", 1) == []


def test_site_update_counts_only_from_its_sites_relay_and_for_its_members(store):
    eng, _ = run(store)
    agg = combine([BoardUpdate("a", 10, A), BoardUpdate("b", 30, B)], "samples")
    args = dict(now=1.0, relay_id="relay-s", round_no=1, base_version=0, site="S", weighting="samples",
                contributors=agg.contributors, mean=agg.mean, meta={})
    v = eng.on_site_update(**args, members={"relay-s": None, "a": "S", "b": "S"})     # not a known relay
    assert not v.accepted and "not registered as the relay" in v.reason
    v = eng.on_site_update(**args, members={"relay-s": "S", "a": "S", "b": "T"})      # b is at site T
    assert not v.accepted and v.exclude == ("b",) and "not registered at site" in v.reason
    assert store.updates("r1", 1) == []
    assert eng.on_site_update(**args, members={"relay-s": "S", "a": "S", "b": "S"}).accepted


def test_robust_strategy_refuses_site_updates_and_tasks_do_not_offer_it(store):
    eng, tasks = run(store, strategy="median")
    assert all("site_agg" not in t.body for t in tasks)
    v = site_up(eng, 1.0, ["a", "b"])
    assert not v.accepted and "cannot be pre-aggregated" in v.reason


@pytest.mark.parametrize("patch,where", [
    ({"contributors": {}}, "body.contributors"), ({"contributors": {"a": 0}}, "body.contributors"),
    ({"contributors": {"a": True}}, "body.contributors"), ({"num_samples": 11}, "body.num_samples"),
    ({"weighting": "median"}, "body.weighting")])
def test_site_update_frames_with_bad_bodies_are_refused_naming_the_field(patch, where):
    from protocol.binary import decode_frame, encode_frame
    from protocol.envelope import DecodeError, Envelope

    body = {"run_id": "r1", "round": 1, "base_version": 0, "num_samples": 10, "site": "S", "weighting": "samples",
            "contributors": {"a": 10}, "encoding": "raw", **patch}
    payload = encode_frame(Envelope(kind="fl.site_update", sender="relay-s", body=body), A)
    with pytest.raises(DecodeError) as exc:
        decode_frame(payload, expect_sender="relay-s")
    assert where in str(exc.value)


def test_a_controller_restarted_after_recording_answers_the_relays_resend_the_same(store):
    """Killed between recording a site update and acking it: the new engine over the same store gives
    the relay's resend the recorded verdict and the boards to ack — nothing counted twice."""
    eng, _ = run(store)
    assert site_up(eng, 1.0, ["a", "b"]).accepted
    again = RoundEngine("r1", store, st.FedAvg())
    v = site_up(again, 2.0, ["a", "b"])
    assert v.accepted and v.duplicate and v.boards == ("a", "b")
    assert sorted(u.device_id for u in store.updates("r1", 1)) == ["a", "b", "relay-s"]
    assert {d for _, d, *_ in store.unacked(("r1",))} == {"a", "b", "relay-s"}   # their acks are resent
    other = site_up(again, 2.5, ["a"])    # a different set from the same relay in the same round
    assert not other.accepted and "already sent" in other.reason


def test_round_history_shows_what_each_site_update_stood_for(tmp_path):
    from click.testing import CliRunner

    from controller.cli import cli

    db = tmp_path / "registry.db"
    store = RoundStore(connect(str(db)))
    eng, _ = run(store)
    assert site_up(eng, 1.0, ["a", "b"]).accepted and eng.on_update(1.5, "c", 1, 0, 20, C, {}).accepted
    eng.step(11.0, [ClientInfo(x, True, 100) for x in "abcd"])
    store.db.commit()
    out = CliRunner().invoke(cli, ["--db", str(db), "round", "status", "r1"])
    assert out.exit_code == 0, out.output
    assert "round 1 site S (relay relay-s): 2 boards (a, b), 40 samples, 99 B" in out.output
