"""Any task, any number of inputs and outputs, binary tensor requests, and an error reply with a
reason code for every refused or failed request: real ONNX Runtime and LiteRT sessions on models
built here (and MediaPipe's real face detector), the Serving feature on a recording context."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from agent.serving.feature import Serving
from agent.serving.inference import InferenceEngine
from agent.serving.tasks import detections, shape_answer, top_k
from protocol.binary import decode_frame, encode_frame
from protocol.bundle import load_bundle
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message
from protocol.salvage import reply_fields
from tests.helpers.models import FACE_TFLITE, bundle_around, conv_bundle, face_bundle, two_input_onnx

from .features.fake_context import FakeContext

REQ = "edgefleet/v1/dev/pi-t/req"


# -- pure: what outputs mean per task ------------------------------------------------------
def test_top_k_is_ordered_and_named():
    got = top_k(np.array([0.1, 0.6, 0.3], np.float32), ["a", "b"], 2)
    assert [(d["label"], d["label_name"]) for d in got] == [(1, "b"), (2, None)]


def test_detections_above_threshold_best_first_with_classes():
    outs = {"boxes": np.array([[[0, 0, 1, 1], [0, 0, 2, 2], [1, 1, 3, 3]]], np.float32),
            "scores": np.array([[0.2, 0.9, 0.6]], np.float32), "classes": np.array([[0, 1, 1]])}
    got = detections(outs, {"boxes": "boxes", "scores": "scores", "classes": "classes", "threshold": 0.5},
                     ["person", "car"])
    assert got["count"] == 2 and [d["score"] for d in got["detections"]] == [0.9, 0.6]
    assert got["detections"][0] == {"box": [0.0, 0.0, 2.0, 2.0], "score": 0.9, "class": 1, "label_name": "car"}


def test_embed_regress_raw_answers():
    v = {"out": np.array([[1.0, 2.0]], np.float32), "other": np.array([np.inf], np.float32)}
    assert shape_answer("embed", v, {}, [])["dim"] == 2
    assert shape_answer("regress", {"out": v["out"]}, {}, []) == {"values": [1.0, 2.0]}
    raw = shape_answer("raw", v, {}, [])["outputs"]
    assert raw["out"]["shape"] == [1, 2] and np.isfinite(raw["other"]["data"]).all()   # JSON-safe


def test_reply_fields_from_a_frame_header_or_the_ends_of_json_never_the_whole():
    env = Envelope(kind="infer.request", sender="cli", body={"x": [0.5] * 200000},
                   reply_to="edgefleet/v1/dev/pi-t/reply/cli", corr="c-42")
    assert reply_fields(encode(env)) == ("edgefleet/v1/dev/pi-t/reply/cli", "c-42")
    frame = encode_frame(Envelope(kind="infer.request", sender="cli", body={}, reply_to="r/t", corr="c1"),
                         {"x": np.zeros((512, 512, 3), np.uint8)})
    assert reply_fields(frame) == ("r/t", "c1")
    assert reply_fields(b'{"reply_to": "a/#"}') == (None, None) and reply_fields(b"\x00" * 10) == (None, None)


def test_a_zstd_frame_round_trips_and_cannot_inflate_past_the_limit():
    env = Envelope(kind="infer.request", sender="cli", body={})
    img = np.zeros((224, 224, 3), np.uint8)
    wire = encode_frame(env, {"image": img}, compress=True)
    assert len(wire) < img.nbytes // 10
    assert np.array_equal(decode_frame(wire).tensors["image"], img)
    with pytest.raises(Exception, match="oversize"):
        decode_frame(wire, max_bytes=100_000)


# -- the Serving feature with real runtimes ---------------------------------------------------
def serve(tmp_path, bundle) -> tuple[FakeContext, Serving]:
    ctx = FakeContext(state={"dir": str(tmp_path / "state")}, model={"bundle": str(bundle)})
    s = Serving(ctx, runtimes=["onnxruntime", "litert"])
    s.start()
    assert s.engine is not None, s.load_error
    return ctx, s


def ask(s: Serving, tensors=None, **body):
    env = Envelope(kind="infer.request", sender="app", body=body, corr="r1")
    payload = encode_frame(env, tensors) if tensors is not None else encode(env)
    req = decode_frame(payload) if tensors is not None else env
    asyncio.run(s.handle_request(req, Message(REQ, payload)))


def test_a_uint8_image_as_a_binary_frame_is_classified_with_top_k(tmp_path):
    ctx, s = serve(tmp_path, conv_bundle(tmp_path / "b", tmp_path))
    img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ask(s, {"image": img})
    ask(s, {"image": img.astype(np.float32)})               # float for a uint8 input: refused, not cast
    ask(s, {"image": img.transpose(2, 0, 1).copy()})        # NCHW for an NHWC model: not reshaped silently
    ask(s, x=[1, 2])
    (_, good), (_, dtype), (_, shape), (_, small) = ctx.replies
    r = good["result"]
    assert good["ok"] and r["task"] == "classify" and len(r["top_k"]) == 2
    assert r["top_k"][0]["label_name"] == r["label_name"] == ["cat", "dog", "bird"][r["label"]]
    assert (dtype["reason"], shape["reason"], small["reason"]) == ("bad_dtype", "bad_shape", "bad_shape")
    assert "uint8" in dtype["error"] and "[32, 32, 3]" in shape["error"]


def test_two_inputs_by_name_two_outputs_by_name_and_a_runtime_failure_gets_an_internal_reply(tmp_path):
    model = two_input_onnx(tmp_path / "two.onnx")
    spec = lambda n, w: {"name": n, "shape": [1, w]}
    ok = bundle_around(tmp_path / "ok", model, {"name": "two", "task": "raw",
                                                "inputs": [spec("a", 3), spec("b", 3)],
                                                "outputs": [spec("sum", 3), spec("product", 3)]})
    ctx, s = serve(tmp_path, ok)
    ask(s, inputs={"a": [1, 2, 3], "b": [4, 5, 6]})
    ask(s, inputs={"a": [1, 2, 3]})
    ask(s, {"a": np.ones((1, 3), np.float32), "b": np.full((1, 3), 2, np.float32)})
    (_, both), (_, missing), (_, frame) = ctx.replies
    assert both["result"]["outputs"]["sum"]["data"] == [[5.0, 7.0, 9.0]]
    assert both["result"]["outputs"]["product"]["data"] == [[4.0, 10.0, 18.0]]
    assert missing["reason"] == "missing_input" and "'b'" in missing["error"]
    assert frame["result"]["outputs"]["product"]["data"] == [[2.0, 2.0, 2.0]]

    broken = bundle_around(tmp_path / "broken", model, {"name": "two", "version": "1.0.1", "task": "raw",
                                                        "inputs": [spec("a", 3), spec("b", 4)]})
    ctx2, s2 = serve(tmp_path / "s2", broken)
    ask(s2, inputs={"a": [1, 2, 3], "b": [1, 2, 3, 4]})                  # ONNX Runtime raises inside run
    ask(s2, inputs={"a": [1, 2, 3], "b": [1, 2, 3, 4]})
    (_, failed), (_, again) = ctx2.replies
    assert failed["ok"] is False and failed["reason"] == "internal" and "inference failed" in failed["error"]
    assert again["reason"] == "internal" and ctx2.rejected.get("internal") == 2   # still serving, still replying


def test_the_real_face_detector_on_litert_matches_the_interpreter(tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    ctx, s = serve(tmp_path, face_bundle(tmp_path / "face", threshold=-2.0))
    assert s.engine.runtime.name == "litert"
    img = np.random.default_rng(2).uniform(-1, 1, (1, 128, 128, 3)).astype(np.float32)
    ask(s, {"input": img})
    (_, rep), = ctx.replies
    interp = Interpreter(model_path=str(FACE_TFLITE))
    interp.allocate_tensors()
    interp.set_tensor(interp.get_input_details()[0]["index"], img)
    interp.invoke()
    logits = {d["name"]: interp.get_tensor(d["index"]) for d in interp.get_output_details()}["classificators"]
    want = np.sort(logits.reshape(-1)[logits.reshape(-1) >= -2.0])[::-1][:5]
    r = rep["result"]
    assert rep["ok"] and r["task"] == "detect" and r["count"] == len(want)
    assert np.allclose([d["score"] for d in r["detections"]], want, atol=1e-5)
    assert all(len(d["box"]) == 4 and d["label_name"] == "face" for d in r["detections"])


def test_the_digits_fast_path_is_kept(example_bundle, digits_test):
    eng = InferenceEngine(load_bundle(example_bundle[0]))
    assert eng._fast and eng.answer(digits_test[0][0]).prediction.label == eng.predict(digits_test[0][0]).label
