import numpy as np
import pytest

from agent.learning import HeadTrainer, LearnConfig, Learner, TrainConfig, loss_and_grads
from agent.learning.drift import DriftConfig, DriftMonitor
from agent.learning.replay import FeatureBuffer
from tests.helpers.learning import blobs, head


@pytest.mark.parametrize("dims,wd,mu", [([8, 3], 0.0, 0.0), ([8, 6, 3], 0.01, 0.0), ([8, 6, 3], 0.01, 0.5)])
def test_gradients_match_finite_differences(dims, wd, mu):
    h = {k: v.astype(np.float64) for k, v in head(dims).items()}
    ref = {k: v + 0.1 for k, v in h.items()}
    x, y = blobs(10, seed=1)
    x = x.astype(np.float64)
    _, g = loss_and_grads(h, x, y, wd, mu, ref)
    eps = 1e-6
    for k, v in h.items():
        for idx in list(np.ndindex(v.shape))[:6]:
            hp = {kk: vv.copy() for kk, vv in h.items()}
            hm = {kk: vv.copy() for kk, vv in h.items()}
            hp[k][idx] += eps
            hm[k][idx] -= eps
            num = (loss_and_grads(hp, x, y, wd, mu, ref)[0] - loss_and_grads(hm, x, y, wd, mu, ref)[0]) / (2 * eps)
            assert g[k][idx] == pytest.approx(num, rel=1e-4, abs=1e-7), (k, idx)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_training_lowers_loss(opt):
    x, y = blobs(300)
    t = HeadTrainer(head([8, 3]), TrainConfig(optimizer=opt, lr=0.05 if opt == "sgd" else 0.01))
    before = loss_and_grads(t.params, x, y)[0]
    rep = t.train(x, y, steps=200)
    assert rep.steps == 200 and loss_and_grads(t.params, x, y)[0] < before * 0.5


def test_prox_term_keeps_the_head_near_its_reference():
    x, y = blobs(300, shift=2.0)
    start = head([8, 3])
    free = HeadTrainer(start, TrainConfig(lr=0.05)).train(x, y, 200) and None
    a = HeadTrainer(start, TrainConfig(lr=0.05))
    a.train(x, y, 200)
    b = HeadTrainer(start, TrainConfig(lr=0.05, prox_mu=5.0))
    b.train(x, y, 200)
    dist = lambda t: sum(float(np.sum((t.params[k] - start[k]) ** 2)) for k in start)  # noqa: E731
    assert dist(b) < dist(a) * 0.5


def test_buffer_is_bounded_balanced_and_refuses_bad_samples():
    buf = FeatureBuffer(dim=8, n_classes=3, max_bytes=40 * 40, policy="class_balanced", holdout_every=5)
    x, y = blobs(2000)
    for f, label in zip(x, y):
        buf.add(f, int(label))
    assert buf.nbytes <= 40 * 40 + 200
    tx, ty = buf.train_view()
    counts = np.bincount(ty, minlength=3)
    assert counts.min() >= counts.max() - 1  # balanced
    assert buf.holdout_size > 0 and buf.added == 2000
    assert "outside" in buf.add(x[0], 7)
    assert "NaN" in buf.add(np.full(8, np.nan), 1)
    assert "expected 8" in buf.add(np.zeros(5), 1)
    assert buf.added == 2000


def test_learner_adopts_better_heads_refuses_worse_and_persists(tmp_path):
    x, y = blobs(400, shift=1.5)
    cfg = LearnConfig(every_n=50, max_steps=300, min_train=20, min_holdout=10, lr=0.05, cpu_fraction=1.0)
    lr = Learner(head([8, 3], seed=3), 3, cfg, tmp_path / "learn", bundle_id="b1")
    for i, (f, label) in enumerate(zip(x, y)):
        assert lr.observe(f"s{i}", f, 0.5, 0.9, int(label), now=0.0) is None
    assert lr.should_train(1.0)
    res = lr.run_cycle()
    assert res.adopted and res.acc_after > res.acc_before and lr.head_version == 1
    # a poisoned label stream cannot make it adopt a worse head
    lr.buffer = FeatureBuffer(8, 3, policy="reservoir")
    for i, (f, label) in enumerate(zip(x, y)):
        lr.buffer.add(f, int(label) if i % 5 == 4 else int((label + 1) % 3))  # train labels wrong, holdout right
    res2 = lr.run_cycle()
    assert not res2.adopted and "holdout accuracy" in res2.reason and lr.head_version == 1
    # restart: the adopted head comes back, only for the same bundle
    again = Learner(head([8, 3], seed=3), 3, cfg, tmp_path / "learn", bundle_id="b1")
    assert again.load_checkpoint() is None and again.head_version == 1
    np.testing.assert_array_equal(again.head["dense0.weight"], lr.head["dense0.weight"])
    other = Learner(head([8, 3]), 3, cfg, tmp_path / "learn", bundle_id="b2")
    assert "another bundle" in other.load_checkpoint()


def test_feedback_labels_later_and_refuses_unknown_or_expired(tmp_path):
    lr = Learner(head([8, 3]), 3, LearnConfig(pending_ttl_s=10), tmp_path, bundle_id="b")
    lr.observe("req-1", np.ones(8), 0.9, 0.1, None, now=0.0)
    lr.observe("req-2", np.ones(8), 0.9, 0.1, None, now=0.0)
    assert lr.feedback("req-1", 2, now=1.0) is None and lr.labelled == 1
    assert "unknown_request" in lr.feedback("req-1", 2, now=1.0)
    assert "unknown_request" in lr.feedback("nope", 1, now=1.0)
    assert "expired" in lr.feedback("req-2", 1, now=100.0)
    lr.observe("req-3", np.ones(8), 0.9, 0.1, None, now=0.0)
    assert "outside" in lr.feedback("req-3", 9, now=1.0)
    assert lr.status()["rejected"]["unknown_request"] == 2


def test_drift_monitor():
    d = DriftMonitor(0.95, 0.1, DriftConfig(alpha=0.1, min_samples=20))
    for _ in range(30):
        d.observe(0.94, 0.12)
    assert not d.drifting
    for _ in range(60):
        d.observe(0.6, 0.9)
    assert d.drifting and d.score > 1
    d.rebase()
    assert not d.drifting
