"""Small ONNX graphs built in the test, the way exporters write them, wrapped as bundles."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

MODELS = Path(__file__).resolve().parents[1] / "models"
FACE_TFLITE = MODELS / "face_detection_short_range.tflite"   # MediaPipe BlazeFace (short range), Apache-2.0


def conv_image_onnx(path: Path, size: int = 32, classes: int = 3, seed: int = 0) -> Path:
    """uint8 NHWC image [1, size, size, 3] → Cast → /255 → NCHW Conv → ReLU → GAP → ``embedding``
    [1, 8] → Gemm → Softmax → ``probs`` [1, classes]: two outputs, a uint8 input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 3, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(8, np.float32), "b")
    fc = numpy_helper.from_array(rng.normal(0, 1.0, (8, classes)).astype(np.float32), "fc")
    fcb = numpy_helper.from_array(np.zeros(classes, np.float32), "fcb")
    scale = numpy_helper.from_array(np.array(1 / 255, np.float32), "scale")
    nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["f", "scale"], ["fs"]),
             helper.make_node("Transpose", ["fs"], ["nchw"], perm=[0, 3, 1, 2]),
             helper.make_node("Conv", ["nchw", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["embedding"]),
             helper.make_node("Gemm", ["embedding", "fc", "fcb"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1)]
    graph = helper.make_graph(
        nodes, "conv_image", [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, size, size, 3])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, classes]),
         helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, 8])],
        [w, b, fc, fcb, scale])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def two_input_onnx(path: Path) -> Path:
    """``a`` + ``b`` → ``sum`` and ``a`` * ``b`` → ``product``; the graph leaves the width dynamic,
    so a manifest that declares different widths makes the runtime itself fail (Add cannot broadcast)."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["product"])]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, "n"])
    graph = helper.make_graph(nodes, "two_inputs", [vi("a"), vi("b")], [vi("sum"), vi("product")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def bundle_around(out: Path, model: Path, manifest: dict) -> Path:
    """A backbone-only bundle: ``model`` plus ``manifest`` (files filled in)."""
    from protocol.bundle import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, out / model.name)
    write_manifest(out, {"version": "1.0.0", **manifest, "files": {model.name: {"role": "backbone"}}})
    return out


def conv_bundle(out: Path, work: Path) -> Path:
    return bundle_around(out, conv_image_onnx(work / "conv_image.onnx"), {
        "name": "conv-image", "task": "classify", "labels": ["cat", "dog", "bird"],
        "inputs": [{"name": "image", "shape": [1, 32, 32, 3], "dtype": "uint8", "min": 0, "max": 255}],
        "outputs": [{"name": "probs", "shape": [1, 3]}], "task_params": {"top_k": 2}})


def face_bundle(out: Path, threshold: float = 0.0) -> Path:
    """The real BlazeFace detector as a detect bundle (logit scores, anchor-relative boxes)."""
    return bundle_around(out, FACE_TFLITE, {
        "name": "face-short", "task": "detect", "labels": ["face"],
        "inputs": [{"name": "input", "shape": [1, 128, 128, 3], "dtype": "float32", "min": -1.0, "max": 1.0}],
        "outputs": [{"name": "regressors", "shape": [1, 896, 16]}, {"name": "classificators", "shape": [1, 896, 1]}],
        "task_params": {"boxes": "regressors", "scores": "classificators", "threshold": threshold,
                        "max_detections": 5}})
