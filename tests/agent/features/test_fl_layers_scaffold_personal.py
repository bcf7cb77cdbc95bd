"""Federated layers, SCAFFOLD's device side and per-board personalization, without a broker."""
from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from agent.learning import personal as pe
from agent.learning.federated import Participant
from agent.learning.trainer import TrainConfig
from protocol.binary import Frame, decode_frame
from protocol.envelope import Envelope
from protocol.layers import LayerError, federated, merge, trainable_tensors
from protocol.mqttlink import Message

from .fake_context import FakeContext
from .test_updates_learning import CMD, RecordingTrainer

HEAD = {"dense0.weight": np.ones((4, 3), np.float32), "dense0.bias": np.zeros(3, np.float32),
        "dense1.weight": np.ones((3, 2), np.float32), "dense1.bias": np.zeros(2, np.float32)}


def frame(tensors, **body):
    b = {"run_id": "run-1", "round": 1, "base_version": 0, "steps": 5, "lr": 0.1, "batch_size": 8,
         "deadline_ts": time.time() + 60, **body}
    return Frame(Envelope(kind="fl.task", sender="controller", body=b), tensors, b"")


def sent_tensors(ctx, i=-1):
    return decode_frame(ctx.on("/data/fl")[i].payload).tensors


def test_trainable_declaration():
    assert trainable_tensors({}, HEAD) == tuple(sorted(HEAD))
    assert trainable_tensors({"trainable": ["dense1"]}, HEAD) == ("dense1.bias", "dense1.weight")
    with pytest.raises(LayerError, match="dense7"):
        trainable_tensors({"trainable": ["dense7"]}, HEAD)
    with pytest.raises(LayerError, match="non-empty list"):
        trainable_tensors({"trainable": "dense1"}, HEAD)
    part = federated(HEAD, ("dense1.bias", "dense1.weight"))
    m = merge(HEAD, {**part, "dense1.bias": np.full(2, 5, np.float32)})
    assert m["dense1.bias"].tolist() == [5, 5] and m["dense0.weight"].sum() == 12
    with pytest.raises(LayerError, match="shape"):
        merge(HEAD, {"dense1.bias": np.zeros(3, np.float32)})
    with pytest.raises(LayerError, match="not in the head"):
        merge(HEAD, {"dense9.bias": np.zeros(3, np.float32)})


def test_only_the_trainable_layers_travel_and_the_rest_is_frozen(tmp_path):
    ctx = FakeContext(state={"dir": str(tmp_path)})
    trainer = RecordingTrainer()
    fed = {"dense1.weight": (3, 2), "dense1.bias": (2,)}
    p = Participant(ctx, trainer, fed, full_head=lambda: HEAD, bundle_id="b1")
    task = {k: HEAD[k] for k in fed}
    asyncio.run(p.on_task(frame(task), Message(CMD, b"")))
    up = sent_tensors(ctx)
    assert set(up) == set(fed)
    assert trainer.calls[0]["frozen"] == ("dense0.bias", "dense0.weight")
    # a task carrying a frozen layer is refused with the reason
    asyncio.run(p.on_task(frame(dict(HEAD), round=2), Message(CMD, b"")))
    assert "global head tensors" in ctx.named("fl.task_refused")[-1]["reason"]


def test_scaffold_task_sends_control_variate_delta_and_keeps_ci_across_restarts(tmp_path):
    ctx = FakeContext(state={"dir": str(tmp_path)})
    shapes = {"w": (2, 3), "b": (3,)}
    tensors = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32),
               "cv.w": np.full((2, 3), 0.1, np.float32), "cv.b": np.zeros(3, np.float32)}
    trainer = RecordingTrainer()
    p = Participant(ctx, trainer, shapes, bundle_id="b1")
    asyncio.run(p.on_task(frame(tensors, scaffold=True), Message(CMD, b"")))
    up = sent_tensors(ctx)
    assert set(up) == {"w", "b", "cv.w", "cv.b"}
    np.testing.assert_allclose(trainer.calls[0]["correction"]["w"], 0.1)     # c − cᵢ with cᵢ = 0
    # RecordingTrainer moves every value by +0.5 in 5 steps of lr 0.1: cᵢ⁺ = 0 − c + (−0.5)/(5·0.1)
    np.testing.assert_allclose(up["cv.w"], -0.1 - 1.0, rtol=1e-5)
    p2 = Participant(ctx, trainer, shapes, bundle_id="b1")                   # the agent restarted
    asyncio.run(p2.on_task(frame(tensors, scaffold=True, round=2), Message(CMD, b"")))
    np.testing.assert_allclose(trainer.calls[1]["correction"]["w"], 0.1 - (-1.1), rtol=1e-5)
    p2.controls.path.write_bytes(b"not an npz")                              # corrupted on disk
    asyncio.run(p2.on_task(frame(tensors, scaffold=True, round=3), Message(CMD, b"")))
    assert "unreadable" in ctx.named("fl.scaffold_reset")[-1]["reason"]
    np.testing.assert_allclose(trainer.calls[2]["correction"]["w"], 0.1)     # recovered from zeros
    assert len(ctx.on("/data/fl")) == 3
    bad = dict(tensors, **{"cv.b": np.zeros(4, np.float32)})
    asyncio.run(p2.on_task(frame(bad, scaffold=True, round=4), Message(CMD, b"")))
    assert "cv.b shape" in ctx.named("fl.task_refused")[-1]["reason"]


def test_gate_serves_personal_only_when_strictly_better():
    assert pe.choose(0.5, 0.6).serve == "personal"
    assert pe.choose(0.6, 0.6).serve == "global"
    assert pe.choose(0.7, float("nan")).serve == "global"


def test_personal_head_learns_the_boards_skew_and_only_its_last_layer(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (200, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)          # this board: class by the sign of feature 0
    head = {"dense0.weight": rng.normal(0, 0.5, (4, 3)).astype(np.float32), "dense0.bias": np.zeros(3, np.float32),
            "dense1.weight": rng.normal(0, 0.5, (3, 2)).astype(np.float32), "dense1.bias": np.zeros(2, np.float32)}
    served, c = pe.personalize(head, x[:150], y[:150], x[150:], y[150:], 300, TrainConfig(lr=0.1, batch_size=16))
    assert c.personal_acc > c.global_acc and c.serve == "personal"
    np.testing.assert_array_equal(served["dense0.weight"], head["dense0.weight"])    # the body stays global
    assert not np.array_equal(served["dense1.weight"], head["dense1.weight"])


def test_personal_store_refuses_another_bundle_other_shapes_and_corruption(tmp_path):
    st = pe.PersonalStore(tmp_path, "bundle-a")
    assert st.load(HEAD) is None
    layer = {"dense1.weight": np.full((3, 2), 2, np.float32), "dense1.bias": np.ones(2, np.float32)}
    st.save(layer)
    np.testing.assert_array_equal(pe.PersonalStore(tmp_path, "bundle-a").load(HEAD)["dense1.weight"], 2)
    with pytest.raises(pe.PersonalHeadError, match="for bundle bundle-a, not bundle-b"):
        pe.PersonalStore(tmp_path, "bundle-b").load(HEAD)
    with pytest.raises(pe.PersonalHeadError, match="do not fit"):
        st.load({**HEAD, "dense1.weight": np.ones((3, 5), np.float32), "dense1.bias": np.zeros(5, np.float32)})
    raw = bytearray(st.path.read_bytes())
    at = bytes(raw).index(np.full((3, 2), 2, np.float32).tobytes())
    raw[at] ^= 1
    st.path.write_bytes(bytes(raw))
    with pytest.raises(pe.PersonalHeadError):
        st.load(HEAD)
