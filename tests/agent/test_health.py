"""The quality gate on real ONNX Runtime sessions: reference outputs, eval floor, shadow vs the serving model."""
import numpy as np
import pytest

from agent.serving.health import Unhealthy, check_bundle
from agent.serving.inference import InferenceEngine
from controller.modeltools.example import derive_bundle
from protocol.bundle import load_bundle, load_head


@pytest.fixture(scope="module")
def serving(example_bundle):
    return InferenceEngine(load_bundle(example_bundle[0]))


def test_a_close_variant_passes_with_its_figures(example_bundle, serving, tmp_path):
    src = example_bundle[0]
    v2 = derive_bundle(src, tmp_path / "v2", "1.1.0", {k: v * 1.01 for k, v in load_head(src / "head.npz").items()})
    fig = check_bundle(v2, current=serving)
    assert fig["version"] == "1.1.0" and fig["reference_agreement"] == 1.0
    assert fig["eval_accuracy"] >= 0.95 and fig["agreement_with_current"] >= 0.98
    assert fig["current_accuracy"] >= 0.95 and fig["eval_p95_ms"] > 0 and fig["current_p95_ms"] > 0


def test_scrambled_labels_fail_the_gate_even_with_matching_reference(example_bundle, serving, tmp_path):
    src = example_bundle[0]
    bad = derive_bundle(src, tmp_path / "bad", "1.2.0",
                        {k: np.roll(v, 3, axis=-1) for k, v in load_head(src / "head.npz").items()})
    with pytest.raises(Unhealthy, match="accuracy"):
        check_bundle(bad, current=serving)


def test_reference_mismatch_fails(example_bundle, tmp_path):
    import shutil

    src = example_bundle[0]
    v = derive_bundle(src, tmp_path / "v", "1.1.0", load_head(src / "head.npz"))
    # swap in another head without regenerating the reference outputs
    other = derive_bundle(src, tmp_path / "o", "1.1.1", {k: np.roll(v, 1, axis=-1) for k, v in load_head(src / "head.npz").items()})
    shutil.copy(other / "head.npz", v / "head.npz")
    from protocol.bundle import write_manifest
    import json

    write_manifest(v, json.loads((v / "manifest.json").read_text()))
    with pytest.raises(Unhealthy, match="reference"):
        check_bundle(v)


def test_manifest_can_bound_agreement_with_the_serving_model(example_bundle, serving, tmp_path):
    import json

    from protocol.bundle import write_manifest

    src = example_bundle[0]
    h = load_head(src / "head.npz")
    h["dense0.bias"][3] += 5.0     # within the accuracy bound, but it changes some labels
    v = derive_bundle(src, tmp_path / "v", "1.1.0", h)
    fig = check_bundle(v, current=serving)
    assert fig["agreement_with_current"] < 1.0
    m = json.loads((v / "manifest.json").read_text())
    m["eval"]["min_agreement_with_current"] = 1.0
    write_manifest(v, m)
    with pytest.raises(Unhealthy, match="agrees with the serving model"):
        check_bundle(v, current=serving)
