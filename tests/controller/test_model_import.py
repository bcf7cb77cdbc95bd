"""Bring your own model: graphs written the way exporters write them, and real pretrained models
shipped inside pip-installed wheels (PaddleOCR's orientation classifier in rapidocr-onnxruntime,
onnxruntime's logreg_iris, a MediaPipe face detector committed under tests/models)."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
import pytest

from agent.serving.health import check_bundle, model_problems
from agent.serving.inference import InferenceEngine
from controller.modeltools.importer import ModelImportError, ImportOptions, deep_verify, import_model
from controller.modeltools.normalize import normalize
from controller.modeltools.quantize import session
from controller.modeltools.split import auto_cut, cut_candidates
from controller.modeltools.wheel_models import iris_model, ocr_cls_model, text_orientation_set
from protocol.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]
FACE = ROOT / "tests" / "models" / "face_detection_short_range.tflite"


def fleetctl(*a):
    return subprocess.run([sys.executable, "-m", "controller.cli", "model", *a], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def _const(name, arr):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr.astype(np.float32), name + "_t"))


def exporter_graph(path: Path, classes: int = 3, seed: int = 0) -> Path:
    """What paddle2onnx/torch.onnx write: Constant weights (no initializers), a dynamic image size,
    Conv → Relu → GlobalAveragePool → Flatten → MatMul + Add → Softmax → Identity."""
    rng = np.random.default_rng(seed)
    nodes = [_const("cw", rng.normal(0, 0.5, (8, 1, 3, 3))), _const("cb", rng.normal(0, 0.1, 8)),
             _const("fw", rng.normal(0, 1, (8, classes))), _const("fb", rng.normal(0, 0.1, classes)),
             helper.make_node("Conv", ["img", "cw", "cb"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["gap"]),
             helper.make_node("Flatten", ["gap"], ["feat"]),
             helper.make_node("MatMul", ["feat", "fw"], ["mm"]),
             helper.make_node("Add", ["mm", "fb"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
             helper.make_node("Identity", ["prob"], ["output"])]
    g = helper.make_graph(nodes, "exported", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def test_normalise_and_cut_an_exporter_graph(tmp_path):
    src = exporter_graph(tmp_path / "m.onnx")
    norm = normalize(src, {"": [1, 1, 8, 8]})
    assert any("4 Constant nodes became initializers" in n for n in norm.notes)
    assert any("Identity" in n for n in norm.notes)
    assert len(norm.model.graph.initializer) >= 4 and norm.model.graph.output[0].name == "output"
    cands = cut_candidates(norm.model)
    assert auto_cut(norm.model).tensor == "feat" and cands[0].features == 8 and cands[0].classes == 3


def test_import_needs_the_sample_shape_then_serves_like_the_original(tmp_path):
    src = exporter_graph(tmp_path / "m.onnx")
    x = np.random.default_rng(1).uniform(0, 1, (24, 1, 8, 8)).astype(np.float32)
    y = session(src).run(None, {"img": x})[0].argmax(1)
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    with pytest.raises(ModelImportError, match="--input-shape"):
        import_model(src, tmp_path / "b0", ImportOptions("m", cut="auto"))
    rep = import_model(src, tmp_path / "b", ImportOptions("m", cut="auto", input_shapes={"": [1, 1, 8, 8]},
                                                          eval=str(tmp_path / "eval.npz"), quantize=False))
    assert rep.cut == "feat" and not (tmp_path / "b0").exists()
    b = load_bundle(tmp_path / "b")
    assert b.manifest.input.shape == (None, 1, 8, 8) and b.head["dense0.weight"].shape == (8, 3)
    eng = InferenceEngine(b)
    assert [eng.predict(xi).label for xi in x] == list(y) and model_problems(eng) == []
    assert check_bundle(tmp_path / "b")["eval_accuracy"] == 1.0
    # the whole model (no cut) is a first-class bundle too: backbone only
    import_model(src, tmp_path / "w", ImportOptions("w", input_shapes={"": [1, 1, 8, 8]}, quantize=False))
    w = InferenceEngine(load_bundle(tmp_path / "w"))
    assert w.bundle.head is None and [w.predict(xi).label for xi in x] == list(y)


def test_quantize_then_split_and_ai_onnx_ml_stay_float(tmp_path):
    from onnxruntime.quantization import QuantFormat, quantize_static

    from controller.modeltools.quantize import _Reader, quiet_ort

    src = exporter_graph(tmp_path / "m.onnx")
    norm = normalize(src, {"": [1, 1, 8, 8]})
    onnx.save(norm.model, str(tmp_path / "n.onnx"))
    x = np.random.default_rng(2).uniform(0, 1, (16, 1, 8, 8)).astype(np.float32)
    with quiet_ort():
        quantize_static(str(tmp_path / "n.onnx"), str(tmp_path / "qdq.onnx"), _Reader([{"img": xi[None]} for xi in x]),
                        quant_format=QuantFormat.QDQ)
    qdq = onnx.load(str(tmp_path / "qdq.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in qdq.graph.node)
    want = session(tmp_path / "qdq.onnx").run(None, {"img": x[:1]})[0]
    rep = import_model(tmp_path / "qdq.onnx", tmp_path / "b", ImportOptions("q", cut="auto", quantize=False))
    b = load_bundle(tmp_path / "b")
    got = InferenceEngine(b).predict(x[0]).probabilities
    assert rep.cut and np.abs(got - want[0]).max() < 0.05
    # ai.onnx.ml after a MatMul: the MatMul is quantized, the Normalizer stays float and we say so
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Normalizer", ["h"], ["y"], domain="ai.onnx.ml", norm="L2")]
    g = helper.make_graph(nodes, "ml", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 256])],
                          [numpy_helper.from_array(np.random.default_rng(3).normal(0, 1, (64, 256)).astype(np.float32), "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "ml.onnx"))
    np.save(tmp_path / "cal.npy", np.random.default_rng(4).normal(0, 1, (16, 64)).astype(np.float32))
    rep = import_model(tmp_path / "ml.onnx", tmp_path / "e", ImportOptions("e", task="embed",
                                                                           calibration=str(tmp_path / "cal.npy")))
    assert rep.kept == "int8" and any("ai.onnx.ml.Normalizer 1" in n for n in rep.notes), rep.notes


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    """PaddleOCR's orientation classifier imported once: cut auto, int8 on rendered text lines."""
    d = tmp_path_factory.mktemp("ocr")
    x, y = text_orientation_set(32, seed=0)
    np.savez(d / "cal.npz", x=x[:8], y=y[:8])
    np.savez(d / "eval.npz", x=x[8:], y=y[8:])
    (d / "labels.txt").write_text("0\n180\n")
    r = fleetctl("import", str(ocr_cls_model()), str(d / "bundle"), "--name", "ocr-cls", "--input-shape", "1,3,48,192",
                 "--cut", "auto", "--labels", str(d / "labels.txt"), "--calibration", str(d / "cal.npz"),
                 "--eval", str(d / "eval.npz"), "--input-min", "-1", "--input-max", "1", "--json")
    assert r.returncode == 0, r.stderr
    return d, json.loads(r.stdout), r


def test_real_ocr_classifier_imports_quantizes_and_serves(ocr):
    d, rep, r = ocr
    assert "WARNING:root" not in r.stderr and "Please consider" not in r.stderr  # onnxruntime kept quiet
    assert rep["cut"] == "reshape2_0.tmp_0" and any("Constant nodes became initializers" in n for n in rep["notes"])
    c = rep["comparison"]
    assert rep["kept"] == "int8" and c["int8_bytes"] * 2 < c["fp32_bytes"]
    assert c["fp32_accuracy"] >= 0.85 and c["agreement"] >= 0.85, c
    b = load_bundle(d / "bundle")
    assert b.manifest.labels == ("0", "180") and b.manifest.input.shape == (None, 3, 48, 192)
    assert deep_verify(d / "bundle") == []
    figures = check_bundle(d / "bundle")
    assert figures["reference_agreement"] == 1.0 and figures["eval_accuracy"] >= 0.85
    text = fleetctl("inspect", str(d / "bundle"))
    assert text.returncode == 0 and "verified" in text.stdout


def test_inspect_raw_models_and_refusals(tmp_path):
    r = fleetctl("inspect", str(ocr_cls_model()), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["inputs"][0]["shape"] == [None, 3, None, None] and info["ops"]["Constant"] == 308
    assert info["auto_cut"] == "reshape2_0.tmp_0" and any("--input-shape" in n for n in info["notes"])
    face = fleetctl("inspect", str(FACE), "--json")
    fi = json.loads(face.stdout)
    assert [o["shape"] for o in fi["outputs"]] == [[1, 896, 16], [1, 896, 1]] and fi["ops"]["CONV_2D"] > 0
    # logreg_iris (ai.onnx.ml only): a clear refusal, no traceback
    np.save(tmp_path / "cal.npy", np.random.default_rng(0).uniform(0, 5, (16, 2)).astype(np.float32))
    q = fleetctl("quantize", str(iris_model()), "--calibration", str(tmp_path / "cal.npy"), "-o", str(tmp_path / "q.onnx"))
    assert q.returncode == 1 and "nothing to quantize" in q.stderr and "Traceback" not in q.stderr
    assert not (tmp_path / "q.onnx").exists()


def test_quantize_never_calls_a_bigger_model_smaller(tmp_path):
    from controller.modeltools.onnx_export import dense_to_onnx
    from controller.modeltools.quantize import Comparison, decide, size_line

    assert size_line(572 * 1024, 673 * 1024) == "572 KB → 673 KB (1.18x bigger)"
    keep, notes = decide(Comparison(1000, 1200, 8, 1.0, 0.0, None, None, 1.0, 1.0))
    assert keep is False and "keeping fp32" in notes[0]
    # a tiny model: quantization parameters outweigh the weights; the CLI says so and writes nothing
    dense_to_onnx([(np.ones((4, 2), np.float32), np.zeros(2, np.float32))], tmp_path / "t.onnx", 4, relu_last=False)
    np.save(tmp_path / "cal.npy", np.random.default_rng(0).uniform(0, 1, (16, 4)).astype(np.float32))
    q = fleetctl("quantize", str(tmp_path / "t.onnx"), "--calibration", str(tmp_path / "cal.npy"), "-o",
                 str(tmp_path / "q.onnx"))
    assert q.returncode == 1 and "not smaller" in q.stderr and "smaller)" not in q.stderr + q.stdout
    assert not (tmp_path / "q.onnx").exists()


def test_real_iris_and_mediapipe_tflite_become_bundles(tmp_path):
    (tmp_path / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    rep = import_model(iris_model(), tmp_path / "iris", ImportOptions(
        "iris", input_shapes={"": [None, 2]}, labels=["setosa", "versicolor", "virginica"]))
    assert any("ZipMap" in n for n in rep.notes)
    eng = InferenceEngine(load_bundle(tmp_path / "iris"))
    p = eng.predict([5.1, 3.5])
    assert p.label_name == "setosa" and abs(float(p.probabilities.sum()) - 1) < 1e-5
    with pytest.raises(ModelImportError, match="14336 values"):
        import_model(FACE, tmp_path / "f0", ImportOptions("face", labels=["face"]))
    import_model(FACE, tmp_path / "face", ImportOptions("face", task="raw"))
    b = load_bundle(tmp_path / "face")
    assert [o.name for o in b.manifest.outputs] == ["regressors", "classificators"]
    assert deep_verify(tmp_path / "face") == [] and b.manifest.file("backbone") == "backbone.tflite"
    assert model_problems(InferenceEngine(b)) == []
