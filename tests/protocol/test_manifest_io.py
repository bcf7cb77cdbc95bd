"""Manifest fields for multi-input / multi-output models and tasks (pure)."""
import pytest

from protocol.bundle import BundleError, TensorSpec, parse_manifest

SHA = "0" * 64


def manifest(**extra):
    d = {"name": "m", "version": "1", "files": {"backbone.onnx": {"sha256": SHA, "size": 1, "role": "backbone"}},
         "input": {"name": "x", "shape": [None, 3], "dtype": "float32"}}
    d.update(extra)
    return d


def test_old_manifest_gets_one_input_no_named_outputs_and_classify():
    m = parse_manifest(manifest())
    assert m.inputs == (TensorSpec("x", (None, 3)),) and m.input is m.inputs[0]
    assert m.outputs == () and m.task == "classify" and m.task_params == {}


def test_inputs_outputs_and_task_are_read_in_order():
    m = parse_manifest(manifest(
        input=None,
        inputs=[{"name": "img", "shape": [None, 8, 8, 3], "dtype": "uint8"}, {"name": "k", "shape": [1], "dtype": "int64"}],
        outputs=[{"name": "boxes", "shape": [None, 4]}, {"name": "scores", "shape": [None]}],
        task="detect", task_params={"boxes": "boxes", "scores": "scores", "threshold": 0.4}))
    assert [s.name for s in m.inputs] == ["img", "k"] and m.input.name == "img" and m.input.dtype == "uint8"
    assert [s.name for s in m.outputs] == ["boxes", "scores"]
    assert m.task == "detect" and m.task_params["threshold"] == 0.4


@pytest.mark.parametrize("extra, field", [
    ({"task": "segment"}, "task"),
    ({"task_params": [1]}, "task_params"),
    ({"inputs": []}, "inputs"),
    ({"inputs": [{"name": "y", "shape": [None, 3]}]}, "input"),  # input and inputs[0] disagree
    ({"outputs": [{"name": "a", "shape": [1]}, {"name": "a", "shape": [2]}]}, "outputs"),
    ({"outputs": [{"name": "a", "shape": [0]}]}, "outputs[0].shape"),
])
def test_bad_io_fields_are_refused_naming_the_field(extra, field):
    with pytest.raises(BundleError, match=rf"manifest {field.replace('[', '.').replace(']', '.')}"):
        parse_manifest(manifest(**extra))
