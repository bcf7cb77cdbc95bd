"""The offload worker's tail (decoder + segments after the cut + head) on real ONNX Runtime
sessions: what matches is computed, what does not is refused with a reason code."""
from __future__ import annotations

import numpy as np
import pytest

from agent.serving.inference import InferenceEngine
from controller.offload.worker import OffloadModel, Refused
from protocol.binary import decode_frame, encode_frame
from protocol.bundle import load_bundle
from protocol.envelope import Envelope
from tests.helpers.bundles import cached_cnn, cached_exit_bundles


@pytest.fixture(scope="module")
def built():
    return cached_exit_bundles()


@pytest.fixture(scope="module")
def board(built):
    e = InferenceEngine(load_bundle(built["pair_a"]))
    e.exits.stop_at_cut = lambda: True
    with np.load(built["pair_a"] / "eval.npz") as z:
        x = z["x"][:150]
    stopped = [(xi, p) for xi in x if (p := e.predict(xi)).resume is not None]
    assert len(stopped) >= 10
    return e, stopped


def request(e, pred, raw=None):
    tensor, extra, compress = e.exits.offload_tensor(pred)
    env = Envelope(kind="offload.request", sender="pi-1", body={"mode": "features", "deadline_ts": 0.0,
                                                                "model": "shapes", **extra},
                   reply_to="edgefleet/v1/dev/pi-1/reply/offload", corr="c" * 32)
    frame = decode_frame(encode_frame(env, {"x": tensor}, compress=compress))
    return frame.tensors["x"], dict(frame.envelope.body)


def test_the_matching_worker_decodes_and_runs_the_tail(built, board):
    e, stopped = board
    w = OffloadModel(load_bundle(built["pair_a"]))
    agree = 0
    for _, p in stopped:
        x, body = request(e, p)
        label, conf = w.answer("features", x, body)
        agree += label == p.resume().label and 0 <= conf <= 1
    assert agree >= 0.85 * len(stopped)


def test_another_pair_another_split_a_plain_bundle_are_refused_with_their_reason(built, board):
    e, stopped = board
    x, body = request(e, stopped[0][1])
    cases = (("pair_b", "decoder_mismatch"), ("other_split", "split_mismatch"), ("exits", "decoder_mismatch"))
    for name, reason in cases:
        w = OffloadModel(load_bundle(built[name]))
        with pytest.raises(Refused) as ei:
            w.answer("features", x, body)
        assert ei.value.code == reason, (name, str(ei.value))
    w = OffloadModel(load_bundle(built["pair_a"]))
    # what the status advertises: a board routes codes of pair A only to this worker
    assert f"{body['split']}+{body['bottleneck']}" in w.accepts()["splits"]
    assert f"{body['split']}+{body['bottleneck']}" not in OffloadModel(load_bundle(built["pair_b"])).accepts()["splits"]
    assert e.exits.routing_split(stopped[0][1]) == f"{body['split']}+{body['bottleneck']}"
    with pytest.raises(Refused, match="decoder takes int8") as ei:
        w.answer("features", x[:, :4], body)
    assert ei.value.code == "bad_input"
    with pytest.raises(Refused) as ei:
        w.answer("features", x, {**body, "exit": 7})
    assert ei.value.code == "split_mismatch"


def test_features_from_an_exit_without_a_bottleneck_run_the_segments_after_it(built):
    e = InferenceEngine(load_bundle(built["exits"]))
    w = OffloadModel(load_bundle(built["exits"]))
    with np.load(built["exits"] / "eval.npz") as z:
        x = z["x"][:100]
    full = InferenceEngine(load_bundle(cached_cnn()[0]))
    early = [(xi, p) for xi in x if (p := e.predict(xi)).exit in (0, 1)][:10]
    assert len(early) >= 5
    agree = 0
    for xi, p in early:
        t, body = request(e, p)
        assert t.dtype == np.uint8 and body["exit"] == p.exit and "codec" not in body
        label, _ = w.answer("features", t, body)
        agree += label == full.predict(xi).label     # the worker ran the rest of the full model
    assert agree >= len(early) - 1
