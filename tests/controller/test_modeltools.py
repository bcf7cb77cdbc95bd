"""Model tooling on real ONNX graphs: split into backbone + head, quantize, inspect."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.serving.inference import InferenceEngine
from controller.modeltools.mlp import forward, init_mlp
from controller.modeltools.onnx_export import dense_to_onnx
from controller.modeltools.split import SplitError, split_model
from protocol.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[2]


def test_split_full_graph_into_backbone_and_head(tmp_path):
    rng = np.random.default_rng(0)
    layers = init_mlp([64, 32, 16, 10], rng)
    dense_to_onnx(layers, tmp_path / "full.onnx", 64, relu_last=False, output_name="logits")
    out = split_model(tmp_path / "full.onnx", "relu1", tmp_path / "b", input_min=0, input_max=16)
    b = load_bundle(out)
    assert b.head["dense0.weight"].shape == (16, 10)
    eng = InferenceEngine(b)
    x = rng.uniform(0, 16, (20, 64)).astype(np.float32)
    want = forward(layers, x)[0].argmax(1)
    assert [eng.predict(xi).label for xi in x] == list(want)
    with pytest.raises(SplitError, match="no tensor"):
        split_model(tmp_path / "full.onnx", "nope", tmp_path / "c")


def test_cli_quantize_and_inspect(tmp_path, example_bundle):
    rng = np.random.default_rng(1)
    dense_to_onnx(init_mlp([64, 256, 64], rng), tmp_path / "m.onnx", 64, relu_last=True)
    np.save(tmp_path / "cal.npy", rng.uniform(0, 16, (32, 64)).astype(np.float32))
    run = lambda *a: subprocess.run([sys.executable, "-m", "controller.cli", "model", *a], capture_output=True,
                                    text=True, cwd=ROOT)
    q = run("quantize", str(tmp_path / "m.onnx"), "--calibration", str(tmp_path / "cal.npy"), "-o", str(tmp_path / "q.onnx"))
    assert q.returncode == 0, q.stderr
    assert (tmp_path / "q.onnx").stat().st_size * 3 < (tmp_path / "m.onnx").stat().st_size
    no_cal = run("quantize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "x.onnx"))
    assert no_cal.returncode == 2 and "--calibration" in no_cal.stderr
    info = run("inspect", str(example_bundle[0]), "--json")
    assert info.returncode == 0
    d = json.loads(info.stdout)
    assert d["name"] == "digits" and d["files"]["backbone.onnx"]["role"] == "backbone" and d["head_layers"] == 1
    (tmp_path / "broken").mkdir()
    bad = run("inspect", str(tmp_path / "broken"))
    assert bad.returncode == 1 and "bad bundle" in bad.stderr
