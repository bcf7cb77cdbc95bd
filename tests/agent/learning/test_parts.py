"""The learner's parts one by one: labels-later, adoption/trigger policy, drift distribution
score, replay split and state, checkpoints, trainer epochs. Pure logic, tmp files only."""
import json
import math
import zipfile

import numpy as np
import pytest

from agent.learning import (CheckpointError, Decision, DriftConfig, DriftMonitor, FeatureBuffer, HeadTrainer,
                            LearnConfig, Learner, PendingLabels, TrainConfig, TriggerState, decide_adoption,
                            read_checkpoint, trigger_reason, write_checkpoint)
from agent.learning.drift import histogram, ks, psi
from tests.helpers.learning import blobs, head


# -- pending (labels later) -------------------------------------------------------------

def test_pending_bounded_by_count_and_age():
    p = PendingLabels(max_items=3, ttl_s=10)
    for i in range(5):
        p.put(f"r{i}", np.full(4, i), now=float(i))
    assert len(p) == 3 and "r0" not in p and "r1" not in p and p.dropped["capacity"] == 2
    c = p.take("r3", now=5.0)
    np.testing.assert_array_equal(c.features, np.full(4, 3.0)) and c.reason is None
    assert p.take("r3", now=5.0).kind == "unknown_request"
    assert p.take("r2", now=12.5).kind == "expired"          # 10.5 s old
    assert p.expire(now=14.5) == 1 and len(p) == 0            # r4 is 10.5 s old
    assert p.dropped["expired"] == 2


def test_pending_refuses_bad_ids_and_copies_features():
    p = PendingLabels()
    f = np.ones(4, np.float32)
    p.put("a", f, 0.0)
    f[:] = 9
    assert p.take("a", 0.0).features.tolist() == [1, 1, 1, 1]
    for bad in ("", "x" * 201, 7, None):
        with pytest.raises(ValueError, match="request id"):
            p.put(bad, f, 0.0)
    assert p.take(None, 0.0).kind == "unknown_request"
    p.put("b", f, 0.0)
    p.put("b", f * 2, 1.0)                                     # a re-sent id replaces the entry
    assert len(p) == 1 and p.take("b", 1.0).features[0] == 18


# -- policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("before,after,n,kw,adopt,why", [
    (0.80, 0.85, 50, {}, True, "0.800 → 0.850"),
    (0.80, 0.80, 50, {}, True, "→"),                           # ties go to the candidate
    (0.80, 0.78, 50, {}, False, "0.780 < current 0.800"),
    (0.80, 0.78, 50, {"margin": 0.03}, True, "→"),
    (0.80, 0.99, 5, {"min_holdout": 10}, False, "holdout has 5 samples, need 10"),
    (0.80, 0.99, 50, {"finite": False}, False, "NaN/inf"),
    (0.80, math.nan, 50, {}, False, "undefined"),
])
def test_adoption_decision(before, after, n, kw, adopt, why):
    d = decide_adoption(before, after, n, **kw)
    assert isinstance(d, Decision) and d.adopt is adopt and why in d.reason


def _ts(**over):
    base = dict(enabled=True, busy=False, train_size=100, holdout_size=20, since_cycle=0, requested=False,
                drifting=False, drift_score=0.0, cpu_share=0.0)
    base.update(over)
    return TriggerState(**base)


def test_trigger_rules():
    assert trigger_reason(_ts(since_cycle=50), every_n=50) == "50 new labelled samples"
    assert trigger_reason(_ts(since_cycle=49), every_n=50) is None
    assert trigger_reason(_ts(requested=True)) == "command"
    assert trigger_reason(_ts(requested=True), trigger="command") == "command"
    assert trigger_reason(_ts(since_cycle=500), trigger="command") is None
    assert trigger_reason(_ts(drifting=True, drift_score=1.7, since_cycle=25), trigger="drift") == "drift score 1.70"
    assert trigger_reason(_ts(drifting=True, since_cycle=5), trigger="drift") is None   # too little new data
    for blocked in (dict(enabled=False), dict(busy=True), dict(train_size=5), dict(holdout_size=2),
                    dict(cpu_share=0.5)):
        assert trigger_reason(_ts(requested=True, **blocked)) is None, blocked
    with pytest.raises(ValueError, match="trigger"):
        trigger_reason(_ts(), trigger="sometimes")


# -- drift distribution score ----------------------------------------------------------------

def test_psi_and_ks_by_hand():
    p, q = np.array([0.5, 0.5]), np.array([0.25, 0.75])
    want = (0.5 - 0.25) * math.log(0.5 / 0.25) + (0.5 - 0.75) * math.log(0.5 / 0.75)
    assert psi(p, q, eps=0.0) == pytest.approx(want)
    assert psi(q, q) == pytest.approx(0.0)
    assert ks(p, q) == pytest.approx(0.25)
    np.testing.assert_allclose(histogram([0.0, 0.05, 0.95, 1.0], 10), [0.5] + [0] * 8 + [0.5])


def test_psi_catches_a_shape_change_the_means_miss():
    rng = np.random.default_rng(0)
    ref = rng.uniform(0.7, 0.9, 2000)                     # confidences around 0.8
    cfg = DriftConfig(alpha=0.02, min_samples=50)
    d = DriftMonitor(0.8, 0.5, cfg, ref_confidences=ref)
    for c in rng.uniform(0.7, 0.9, 200):
        d.observe(float(c), 0.5)
    assert not d.drifting and d.psi < 0.1
    for i in range(300):                                   # bimodal, same mean 0.8: sure or lost
        d.observe(0.99 if i % 2 else 0.61, 0.5)
    assert abs(d.conf - 0.8) < 0.02 and d.score < 1      # the means see nothing...
    assert d.psi > cfg.psi_threshold and d.drifting       # ...the distribution does
    assert d.status()["ks"] > 0.3
    d.rebase()
    assert d.psi < 0.01 and not d.drifting
    d.observe(float("nan"), 0.1)                          # ignored, not a crash
    assert d.n == 500


# -- replay --------------------------------------------------------------------------------

def test_hash_split_is_stable_per_sample_id():
    x, y = blobs(300)
    a = FeatureBuffer(8, 3, split="hash")
    b = FeatureBuffer(8, 3, split="hash")
    for i in range(300):
        a.add(x[i], int(y[i]), f"id{i}")
    for i in reversed(range(300)):                        # other order, same ids: same sides
        b.add(x[i], int(y[i]), f"id{i}")
    assert a.holdout_size == b.holdout_size and 30 < a.holdout_size < 90
    assert sorted(map(tuple, a.holdout_view()[0])) == sorted(map(tuple, b.holdout_view()[0]))
    assert "sample id" in a.add(x[0], 1)


def test_buffer_state_round_trip_and_refusals():
    x, y = blobs(500)
    buf = FeatureBuffer(8, 3, max_bytes=200 * 40, policy="reservoir")
    for f, label in zip(x, y):
        buf.add(f, int(label))
    st = buf.state()
    again = FeatureBuffer(8, 3, max_bytes=200 * 40, policy="reservoir")
    again.load_state(st)
    for v1, v2 in zip(buf.train_view() + buf.holdout_view(), again.train_view() + again.holdout_view()):
        np.testing.assert_array_equal(v1, v2)
    assert again.added == 500 and again._train[0].seen == buf._train[0].seen
    small = FeatureBuffer(8, 3, max_bytes=50 * 40, policy="reservoir")   # shrunk cap: keeps what fits
    small.load_state(st)
    assert small.train_size == small._train[0].cap < buf.train_size
    with pytest.raises(ValueError, match="another replay policy"):
        FeatureBuffer(8, 3, policy="class_balanced").load_state(st)
    with pytest.raises(ValueError, match="this one for 16"):
        FeatureBuffer(16, 3, policy="reservoir").load_state(st)
    bad = dict(st)
    bad["hold.y"] = bad["hold.y"] + 7
    with pytest.raises(ValueError, match="inconsistent"):
        FeatureBuffer(8, 3, max_bytes=200 * 40, policy="reservoir").load_state(bad)


# -- checkpoint --------------------------------------------------------------------------------

def test_checkpoint_restores_head_buffer_and_counters(tmp_path):
    x, y = blobs(300, shift=1.5)
    cfg = LearnConfig(max_steps=200, min_train=20, min_holdout=10, cpu_fraction=1.0, isolate="thread")
    lr = Learner(head([8, 3], seed=3), 3, cfg, tmp_path / "l", bundle_id="b1")
    for i, (f, label) in enumerate(zip(x, y)):
        lr.observe(f"s{i}", f, 0.5, 0.9, int(label), now=0.0)
    res = lr.run_cycle(max_steps=150, budget_s=30)
    assert res.adopted and res.steps == 150 and res.new_head is res.head
    assert res.holdout_acc_after >= res.holdout_acc_before
    assert [p.name for p in (tmp_path / "l").iterdir()] == ["checkpoint.npz"]   # no temp file left
    again = Learner(head([8, 3], seed=3), 3, cfg, tmp_path / "l", bundle_id="b1")
    assert again.load_checkpoint() is None and again.restore_note is None
    assert again.head_version == 1 and again.labelled == 300 and again.cycles["adopted"] == 1
    np.testing.assert_array_equal(again.buffer.train_view()[0], lr.buffer.train_view()[0])
    np.testing.assert_array_equal(again.head["dense0.weight"], lr.head["dense0.weight"])
    # an explicit directory works too
    lr.save_checkpoint(tmp_path / "copy")
    assert Learner(head([8, 3]), 3, cfg, tmp_path / "x", "b1").load_checkpoint(tmp_path / "copy") is None


def test_checkpoint_refuses_corrupt_files_with_a_reason(tmp_path):
    h = head([8, 3])
    assert "no checkpoint" in str(pytest.raises(CheckpointError, read_checkpoint, tmp_path).value)
    p = write_checkpoint(tmp_path, h, {"bundle_id": "b"}, {"meta": np.array([8, 3, 0])})
    got, meta, replay = read_checkpoint(tmp_path)
    assert meta == {"bundle_id": "b"} and set(replay) == {"meta"}
    np.testing.assert_array_equal(got["dense0.bias"], h["dense0.bias"])
    raw = p.read_bytes()
    for bad in (raw[: len(raw) // 2], b"", b"garbage" * 10, raw[:-30]):
        p.write_bytes(bad)
        with pytest.raises(CheckpointError, match="unreadable"):
            read_checkpoint(tmp_path)
    with zipfile.ZipFile(p, "w") as z:                     # a readable archive with a wrong head
        z.writestr("meta.npy", b"")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path)
    lr = Learner(h, 3, LearnConfig(isolate="thread"), tmp_path, "b")
    assert "unreadable" in lr.load_checkpoint() or "meta" in lr.load_checkpoint()
    with pytest.raises(ValueError):                        # a NaN head is never written
        write_checkpoint(tmp_path / "n", {**h, "dense0.bias": np.full(3, np.nan, np.float32)}, {})


def test_legacy_checkpoint_layout_still_restores(tmp_path):
    from protocol.bundle import save_head_atomic

    h = head([8, 3], seed=5)
    save_head_atomic(tmp_path / "head.npz", h)
    (tmp_path / "meta.json").write_text(json.dumps({"bundle_id": "b", "head_version": 4}))
    lr = Learner(head([8, 3]), 3, LearnConfig(isolate="thread"), tmp_path, "b")
    assert lr.load_checkpoint() is None and lr.head_version == 4
    np.testing.assert_array_equal(lr.head["dense0.weight"], h["dense0.weight"])


# -- trainer and learner edges --------------------------------------------------------------

def test_train_by_epochs_and_bad_arguments():
    x, y = blobs(100)
    t = HeadTrainer(head([8, 3]), TrainConfig(batch_size=32))
    rep = t.train(x, y, epochs=2)
    assert rep.steps == math.ceil(2 * 100 / 32) and rep.samples == rep.steps * 32 and rep.samples_per_s > 0
    with pytest.raises(ValueError, match="not both"):
        t.train(x, y, 5, epochs=1)
    with pytest.raises(ValueError, match="steps or epochs"):
        t.train(x, y)
    with pytest.raises(ValueError, match="labels"):
        t.train(x[:0], y[:0], 5)
    for bad in (dict(momentum=1.0), dict(weight_decay=-1), dict(prox_mu=-0.1), dict(optimizer="lbfgs")):
        with pytest.raises(ValueError):
            TrainConfig(**bad)
    with pytest.raises(ValueError, match="holdout_split"):
        LearnConfig(holdout_split="random")


def test_learner_refuses_a_diverging_candidate(tmp_path):
    x, y = blobs(200)
    cfg = LearnConfig(lr=9.0, momentum=0.99, max_steps=400, min_train=10, min_holdout=5, isolate="thread",
                      weight_decay=0.0)
    lr = Learner(head([8, 3]), 3, cfg, tmp_path, "b")
    for i, (f, label) in enumerate(zip(x * 1e37, y)):   # finite, but overflows the logits
        lr.observe(f"s{i}", f, 0.5, 0.9, int(label), now=0.0)
    res = lr.run_cycle()
    assert not res.adopted and lr.head_version == 0
    assert any(w in res.reason for w in ("diverged", "NaN", "<")), res.reason
    assert lr.status()["cycles"] == {"adopted": 0, "rejected": 1}
