"""The agent serving a bundle with early exits (real ONNX Runtime sessions on the shapes CNN):
segment by segment, first confident exit, faults at load (a broken exit head, a broken segment)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from agent.serving.inference import InferenceEngine
from protocol.bundle import head_bytes, load_bundle, write_manifest
from tests.helpers.bundles import cached_cnn, cached_exit_bundles


@pytest.fixture(scope="module")
def built():
    return cached_exit_bundles()


@pytest.fixture(scope="module")
def eval_set(built):
    with np.load(built["exits"] / "eval.npz") as z:
        return z["x"][:200], z["y"][:200]


def test_a_bundle_without_exits_keeps_the_one_call_fast_path():
    e = InferenceEngine(load_bundle(cached_cnn()[0]))
    assert e.exits is None and "predict" not in vars(e)     # the class's predict, not the exit runner's
    assert "early_exits" not in e.metrics()


def test_exits_answer_early_run_later_segments_only_when_needed(built, eval_set):
    x, y = eval_set
    full = InferenceEngine(load_bundle(cached_cnn()[0]))
    e = InferenceEngine(load_bundle(built["exits"]))
    assert e.exits is not None and e.exits.disabled == {}
    preds = [e.predict(xi) for xi in x]
    ref = [full.predict(xi) for xi in x]
    m = e.metrics()["early_exits"]
    rows = m["exits"]
    assert sum(r["answered"] for r in rows) == len(x) == e.count
    assert rows[0]["answered"] > 0 and rows[-1]["tensor"] == "final"
    assert 0.2 < m["compute_saved"] < 1.0
    # later segments ran only for what no exit answered
    assert e.exits.seg_runs[2] == rows[-1]["answered"] and e.exits.seg_runs[0] == len(x)
    # what the full model answers is bit for bit the backbone's answer; early answers agree mostly
    for p, r in zip(preds, ref):
        if p.exit == 2:
            assert p.label == r.label and abs(p.confidence - r.confidence) < 1e-5
    agree = np.mean([p.label == r.label for p, r in zip(preds, ref)])
    acc_e = np.mean([p.label == yi for p, yi in zip(preds, y)])
    acc_f = np.mean([r.label == yi for r, yi in zip(ref, y)])
    assert agree >= 0.95 and acc_e >= acc_f - 0.03
    for p, yi in zip(preds, y):
        e.exits.observe(p, int(yi))
    rows = e.exits.metrics()["exits"]
    assert sum(r["labelled"] for r in rows) == len(x)
    assert all(r["accuracy"] is None or 0.5 <= r["accuracy"] <= 1 for r in rows)
    assert m["time_saved_ms"] > 0


def test_stop_at_the_bottleneck_exit_resumes_to_the_same_answer(built, eval_set):
    x, _ = eval_set
    e = InferenceEngine(load_bundle(built["pair_a"]))
    plain = InferenceEngine(load_bundle(built["pair_a"]))
    e.exits.stop_at_cut = lambda: True
    stopped = 0
    for xi in x[:60]:
        p = e.predict(xi)
        want = plain.predict(xi)
        if p.resume is not None:
            stopped += 1
            assert p.exit == 0 and p.confidence < e.exits.thresholds[0]
            code, extra, compress = e.exits.offload_tensor(p)
            assert code.dtype == np.int8 and code.shape == (1, 5, 8, 8) and compress
            assert extra["codec"] == "int8+zstd" and "exit" not in extra and "scale" not in extra
            p = p.resume()
        assert p.label == want.label and p.resume is None
    assert stopped > 0
    assert e.count == 60       # a stop is not an answer: each request counted once


def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    man = json.loads((dst / "manifest.json").read_text())
    edit(dst, man)
    write_manifest(dst, man)
    return dst


def test_an_exit_head_that_does_not_load_is_disabled_and_the_bundle_still_serves(built, eval_set, tmp_path):
    x, _ = eval_set

    def bad_head(d, man):   # a well-formed head of the wrong width for exit 1's tensor
        (d / "exit1.npz").write_bytes(head_bytes({"dense0.weight": np.zeros((3, 8), np.float32),
                                                   "dense0.bias": np.zeros(8, np.float32)}))

    b = _rewrite(built["exits"], tmp_path / "bad", bad_head)
    e = InferenceEngine(load_bundle(b))
    good = InferenceEngine(load_bundle(built["exits"]))
    assert list(e.exits.disabled) == ["block3"] and "takes 3 features" in e.exits.disabled["block3"]
    preds = [e.predict(xi) for xi in x[:80]]
    assert all(p.exit != 1 for p in preds)
    m = e.metrics()["early_exits"]
    assert m["disabled"] == e.exits.disabled and m["exits"][1]["answered"] == 0
    # exits 0, 2 and the full model still answer as they do in the good bundle
    for xi, p in zip(x[:80], preds):
        g = good.predict(xi)
        if g.exit != 1:
            assert (p.exit, p.label) == (g.exit, g.label)


def test_a_segment_that_does_not_chain_refuses_the_exits_and_serves_the_whole_backbone(built, eval_set, tmp_path):
    x, _ = eval_set

    def swap(d, man):     # segment 1 replaced by segment 2: the chain no longer holds
        shutil.copy(d / "segment2.onnx", d / "segment1.onnx")

    e = InferenceEngine(load_bundle(_rewrite(built["exits"], tmp_path / "swap", swap)))
    full = InferenceEngine(load_bundle(cached_cnn()[0]))
    assert e.exits is None and "segments[1]" in e.exits_error
    assert e.metrics()["early_exits_error"] == e.exits_error
    assert [e.predict(xi).label for xi in x[:20]] == [full.predict(xi).label for xi in x[:20]]


def test_the_runner_pools_as_the_trainer_did(built):
    from protocol.exits import exit_features

    e = InferenceEngine(load_bundle(built["exits"]))
    t = np.random.default_rng(0).uniform(0, 3, (1, 32, 8, 8)).astype(np.float32)
    got = (t.reshape(32, -1) @ e.exits._pool[0]).reshape(1, -1)
    assert np.allclose(got, exit_features(t, e.exits.specs[0].pool), atol=1e-6)
