"""Deep verification is pure: the manifest against a model's IO as a runtime reports it."""
import numpy as np

from protocol.bundle import parse_manifest
from protocol.verify import ModelIO, errors, io_of_runtime, verify

SHA = "0" * 64


def manifest(**kw):
    d = {"name": "m", "version": "1", "input": {"name": "x", "shape": [None, 3, 48, 192]},
         "files": {"backbone.onnx": {"sha256": SHA, "size": 1, "role": "backbone"}}, **kw}
    return parse_manifest(d)


X = ModelIO("x", (None, 3, 48, 192), "float32")
Y = ModelIO("y", (None, 2), "float32")


def test_a_matching_manifest_has_no_problem():
    assert verify(manifest(labels=["0", "180"]), [X], [Y]) == []


def test_dynamic_sample_dims_are_refused_unless_the_task_declares_them():
    m = manifest(input={"name": "x", "shape": [None, 3, None, None]})
    p = errors(verify(m, [ModelIO("x", (None, 3, None, None), "float32")], [Y]))
    assert len(p) == 1 and "dimension(s) [2, 3] dynamic" in str(p[0]) and "--input-shape" in str(p[0])
    m2 = manifest(input={"name": "x", "shape": [None, 3, None, None]}, task="raw", task_params={"dynamic_dims": True})
    assert errors(verify(m2, [ModelIO("x", (None, 3, None, None), "float32")], [Y])) == []


def test_shape_rank_dtype_and_names_are_checked():
    assert "dimension 3 is 192" in str(errors(verify(manifest(), [ModelIO("x", (1, 3, 48, 100), "float32")], [Y]))[0])
    assert "rank 4" in str(errors(verify(manifest(), [ModelIO("x", (1, 3, 48), "float32")], [Y]))[0])
    assert "uint8" in str(errors(verify(manifest(), [ModelIO("x", (1, 3, 48, 192), "uint8")], [Y]))[0])
    # a quantized LiteRT tensor takes float32 (the runtime converts with its own scale)
    assert errors(verify(manifest(), [ModelIO("x", (1, 3, 48, 192), "uint8", quantized=True)], [Y])) == []
    # one input fed by position: a generic old name is a warning, not a refusal
    p = verify(manifest(), [ModelIO("serving_default_x:0", (1, 3, 48, 192), "float32")], [Y])
    assert [q.severity for q in p] == ["warning"]
    two = manifest(inputs=[{"name": "x", "shape": [None, 3, 48, 192]}, {"name": "mask", "shape": [None, 4]}])
    p = errors(verify(two, [X, ModelIO("m", (None, 4), "float32")], [Y]))
    assert any("no input 'mask'" in str(q) for q in p)
    p = errors(verify(manifest(), [X, ModelIO("m", (None, 4), "float32")], [Y]))
    assert any("also needs ['m']" in str(q) for q in p)


def test_label_count_against_the_served_output_or_the_head():
    p = errors(verify(manifest(labels=["face"]), [X], [ModelIO("scores", (1, 896, 16), "float32")]))
    assert "1 labels; the model's 'scores' has 14336 values" in str(p[0])
    head = {"dense0.weight": np.zeros((200, 5)), "dense0.bias": np.zeros(5)}
    feat = ModelIO("f", (None, 200), "float32")
    p = errors(verify(manifest(labels=["a", "b"], features={"name": "f", "shape": [None, 200]}), [X], [feat], head))
    assert "2 labels; the head outputs 5" in str(p[0])
    p = errors(verify(manifest(labels=list("abcde")), [X], [ModelIO("f", (None, 100), "float32")], head))
    assert "takes 200 features" in str(p[0])


def test_outputs_by_name_and_detect_params():
    m = manifest(task="detect", outputs=[{"name": "boxes", "shape": [None, 896, 16]}],
                 task_params={"boxes": "boxes", "scores": "nope"})
    p = errors(verify(m, [X], [ModelIO("boxes", (1, 896, 16), "float32"), ModelIO("scores", (1, 896, 1), "float32")]))
    assert [q.where for q in p] == ["task_params.scores"]
    m = manifest(task="raw", outputs=[{"name": "gone", "shape": [None, 2]}])
    assert "no output 'gone'" in str(errors(verify(m, [X], [Y]))[0])


def test_io_of_runtime_reads_an_onnxruntime_session(tmp_path):
    from controller.modeltools.onnx_export import dense_to_onnx
    from controller.modeltools.quantize import session

    dense_to_onnx([(np.ones((4, 3), np.float32), np.zeros(3, np.float32))], tmp_path / "m.onnx", 4, relu_last=False)
    ins, outs = io_of_runtime(session(tmp_path / "m.onnx"))
    assert ins == [ModelIO("input", (None, 4), "float32")] and outs == [ModelIO("features", (None, 3), "float32")]
