"""Real ONNX Runtime and LiteRT sessions through the agent's engine; bad bundles and bad inputs."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.serving.histogram import LatencyHistogram
from agent.serving.inference import InferenceEngine, InputError
from agent.serving.runtimes import available_runtimes
from protocol.bundle import BundleError, load_bundle, write_manifest
from tests.helpers.bundles import make_plain_bundle

MODELS = Path(__file__).resolve().parents[1] / "models"


def accuracy(engine, x, y):
    return float(np.mean([engine.predict(xi).label == yi for xi, yi in zip(x, y)]))


def test_example_bundle_int8_onnx_is_accurate(example_bundle, digits_test):
    path, report = example_bundle
    assert report.int8_bytes * 3.5 < report.fp32_bytes
    assert report.int8_accuracy >= 0.95 and abs(report.fp32_accuracy - report.int8_accuracy) <= 0.01
    eng = InferenceEngine(load_bundle(path))
    x, y = digits_test
    assert accuracy(eng, x, y) == pytest.approx(report.int8_accuracy, abs=0.003)
    m = eng.metrics()
    assert m["inferences"] == len(x) and m["latency_ms"]["p99_ms"] > 0 and 0.5 < m["mean_confidence"] <= 1


@pytest.mark.parametrize("model,min_acc", [("digits_float.tflite", 0.93), ("digits_int8.tflite", 0.93)])
def test_litert_float_and_int8(tmp_path, model, min_acc):
    assert "litert" in available_runtimes()
    b = load_bundle(make_plain_bundle(tmp_path / "b", MODELS / model))
    eng = InferenceEngine(b)
    assert eng.runtime.name == "litert"
    x, y = np.load(MODELS / "digits_test_x.npy"), np.load(MODELS / "digits_test_y.npy")
    acc = accuracy(eng, x, y)
    assert acc >= min_acc
    p = eng.predict(x[0])
    assert abs(float(p.probabilities.sum()) - 1) < 1e-3


def test_int8_and_float_litert_agree(tmp_path):
    x = np.load(MODELS / "digits_test_x.npy")
    f = InferenceEngine(load_bundle(make_plain_bundle(tmp_path / "f", MODELS / "digits_float.tflite")))
    q = InferenceEngine(load_bundle(make_plain_bundle(tmp_path / "q", MODELS / "digits_int8.tflite")))
    agree = np.mean([f.predict(xi).label == q.predict(xi).label for xi in x])
    assert agree >= 0.95


def copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("damage,msg", [
    (lambda d: (d / "head.npz").unlink(), "head.npz: missing"),
    (lambda d: (d / "backbone.onnx").write_bytes(b"x" + (d / "backbone.onnx").read_bytes()[1:]), "SHA-256 mismatch"),
    (lambda d: (d / "manifest.json").write_text("{nope"), "cannot read JSON"),
    (lambda d: _edit(d, lambda m: m.update(version="")), "manifest version"),
    (lambda d: _edit(d, lambda m: m["input"].update(shape=[0, 64])), "input.shape"),
    (lambda d: _edit(d, lambda m: m.update(labels=["a", "b"])), "manifest has 2 labels"),
    (lambda d: _edit(d, lambda m: m["files"]["../../etc/passwd"].update() if False else
                     m["files"].update({"../evil": {"role": "other", "sha256": "0" * 64, "size": 1}})), "unsafe"),
    (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
])
def test_bad_bundles_are_refused_with_the_reason(example_bundle, tmp_path, damage, msg):
    d = copy_bundle(example_bundle[0], tmp_path / "b")
    damage(d)
    with pytest.raises(BundleError, match=msg.replace("(", r"\(")):
        load_bundle(d)


def _edit(d, fn):
    m = json.loads((d / "manifest.json").read_text())
    fn(m)
    (d / "manifest.json").write_text(json.dumps(m))


def test_bad_input_gets_a_clear_error_and_the_next_request_works(example_bundle, digits_test):
    eng = InferenceEngine(load_bundle(example_bundle[0]))
    x, y = digits_test
    cases = [([1.0, 2.0], "shape"), ([[float("nan")] * 64], "NaN"), ([20.0] * 64, "outside the model's range"),
             ("hello", "not numeric"), ([[0.0] * 64] * 2, "shape"), ([-1.0] * 64, "outside")]
    for bad, msg in cases:
        with pytest.raises(InputError, match=msg):
            eng.predict(bad)
        assert eng.predict(x[0]).label == y[0]
    assert eng.predict(x[0].reshape(8, 8)).label == y[0]  # 8x8 image is the same 64 values
    assert eng.metrics()["input_errors"] == len(cases)


def test_head_swap_is_atomic_and_validated(example_bundle, digits_test):
    b = load_bundle(example_bundle[0])
    eng = InferenceEngine(b)
    x, y = digits_test
    head = {k: v.copy() for k, v in b.head.items()}
    with pytest.raises(ValueError, match="shapes differ"):
        eng.swap_head({"dense0.weight": np.zeros((64, 5), np.float32), "dense0.bias": np.zeros(5, np.float32)})
    bad = dict(head)
    bad["dense0.bias"] = np.full_like(head["dense0.bias"], np.nan)
    with pytest.raises(ValueError, match="NaN"):
        eng.swap_head(bad)
    assert eng.predict(x[0]).label == y[0]
    zero = {k: np.zeros_like(v) for k, v in head.items()}
    eng.swap_head(zero)
    assert eng.head_version == 1 and eng.predict(x[0]).confidence == pytest.approx(0.1)


def test_histogram_quantiles_match_numpy():
    rng = np.random.default_rng(0)
    data = rng.lognormal(0, 1, 50_000)
    h = LatencyHistogram()
    for v in data:
        h.record(float(v))
    for q in (0.5, 0.95, 0.99):
        assert h.quantile(q) == pytest.approx(np.quantile(data, q), rel=0.02)
    assert h.count == len(data) and LatencyHistogram().quantile(0.5) is None
