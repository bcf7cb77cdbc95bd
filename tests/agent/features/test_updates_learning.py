"""The Updater, the federated Participant and the learning feature on a recording context:
real bundles, real signed patches, real ONNX Runtime; no broker, no daemon."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from agent.learning.feature import Adaptation
from agent.learning.federated import Participant
from agent.serving.feature import Serving
from agent.updates.feature import Updater
from agent.updates.states import TRANSITIONS, UpdateState, UpdateStateError
from protocol.binary import Frame
from protocol.chunks import make_manifest
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message
from protocol.patch import bundle_id, make_patch
from protocol.signing import generate, save_keypair

from .fake_context import FakeContext

CMD = "edgefleet/v1/dev/pi-t/cmd"


# -- the update table (pure) --------------------------------------------------------------
def test_the_table_takes_a_whole_update_and_refuses_steps_out_of_order():
    s = UpdateState()
    for step in ("downloading", "received", "verified", "staged", "healthy"):
        s.advance(step)
    assert s.advance("applied") == "idle" and not s.busy
    s.advance("downloading")
    with pytest.raises(UpdateStateError, match="'applied' after 'downloading'"):
        s.advance("applied")
    with pytest.raises(UpdateStateError, match="sticky"):
        s.advance("received")                     # the error state is sticky until reset
    s.reset()
    s.advance("downloading")
    assert s.advance("failed") == "idle"          # anything not final may fail


def test_every_state_can_fail_or_is_the_start():
    assert all({"failed", "rolled_back"} <= allowed for st, allowed in TRANSITIONS.items() if st != "idle")


# -- the updater ---------------------------------------------------------------------------
@pytest.fixture
def fleet(tmp_path, example_bundle):
    from controller.modeltools.example import derive_bundle
    from protocol.bundle import load_bundle

    v1 = example_bundle[0]
    head = {k: (v * 0.9).astype(np.float32) for k, v in load_bundle(v1).npz("head").items()}
    v2 = derive_bundle(v1, tmp_path / "v2", "1.1.0", head)
    key = generate()
    save_keypair(key, tmp_path / "k.pem", tmp_path / "k.pub")
    ctx = FakeContext(state={"dir": str(tmp_path / "state")}, model={"bundle": str(v1)},
                      security={"trusted_keys": [str(tmp_path / "k.pub")]})
    serving = Serving(ctx)
    serving.start()
    up = Updater(ctx, serving)
    up.start()
    return ctx, serving, up, v1, v2, key


def offer_for(v1, v2, data, chunk_size=4096, **extra):
    man = make_manifest("t-1", data, chunk_size)
    body = {"rollout_id": "r1", "target": {"version": json.loads((v2 / "manifest.json").read_text())["version"],
                                           "bundle_sha256": bundle_id(v2)},
            "base": {"version": "1.0.0", "bundle_sha256": bundle_id(v1)}, "transfer": man.to_dict(), **extra}
    return man, Envelope(kind="model.offer", sender="controller", body=body)


def chunk(man, data, i):
    env = Envelope(kind="xfer.chunk", sender="controller", body={"transfer_id": man.transfer_id, "index": i})
    return Frame(env, {}, data[i * man.chunk_size:(i + 1) * man.chunk_size])


def statuses(ctx):
    return [e["status"] for e in ctx.named("model.update")]


def test_an_offer_is_pulled_chunk_by_chunk_gated_and_applied(fleet):
    ctx, serving, up, v1, v2, key = fleet
    data, _ = make_patch(v1, v2, key)
    man, offer = offer_for(v1, v2, data)
    assert set(up.control_kinds()) == {"model.offer", "xfer.chunk"}

    async def main():
        await up.on_offer(offer, Message(CMD, b""))
        wants = [p.body for p in ctx.on("/data/xfer")]
        assert wants and wants[0]["transfer_id"] == "t-1"
        for i in range(man.count):
            await up.on_chunk(chunk(man, data, i), Message(CMD, b""))

    asyncio.run(main())
    assert statuses(ctx) == ["downloading", "received", "verified", "staged", "healthy", "applied"]
    healthy = ctx.named("model.update")[4]
    assert len(healthy) > 8                                 # the gate's figures travel with the event
    assert serving.engine.bundle.manifest.version == "1.1.0" and ctx.states >= 1
    assert up.telemetry()["applied"] == 1 and up.active is None and up.state.state == "idle"


def test_refusals_are_reported_with_their_reason_and_nothing_changes(fleet, tmp_path):
    ctx, serving, up, v1, v2, key = fleet
    data, _ = make_patch(v1, v2, key)
    _, wrong_base = offer_for(v2, v2, data)
    _, too_big = offer_for(v1, v2, data)
    too_big.body["transfer"]["total_size"] = 1 << 40
    _, same = offer_for(v1, v1, data)

    async def main():
        await up.on_offer(wrong_base, Message(CMD, b""))
        await up.on_offer(same, Message(CMD, b""))
        await up.on_chunk(chunk(make_manifest("t-9", data, 4096), data, 0), Message(CMD, b""))
        await up.on_chunk(Envelope(kind="xfer.chunk", sender="c", body={}), Message(CMD, b""))

    asyncio.run(main())
    events = ctx.named("model.update")
    assert [e["status"] for e in events] == ["failed", "unchanged"]
    assert "wrong base" in events[0]["reason"] and events[1]["reason"] == "already installed"
    assert ctx.rejected == {"stray_chunk": 1, "chunk_not_a_frame": 1}
    assert serving.engine.bundle.manifest.version == "1.0.0" and up.state.state == "idle"


def test_a_patch_signed_by_an_unknown_key_fails_after_download(fleet):
    ctx, serving, up, v1, v2, key = fleet
    data, _ = make_patch(v1, v2, generate())
    man, offer = offer_for(v1, v2, data)

    async def main():
        await up.on_offer(offer, Message(CMD, b""))
        for i in range(man.count):
            await up.on_chunk(chunk(man, data, i), Message(CMD, b""))

    asyncio.run(main())
    assert statuses(ctx)[:2] == ["downloading", "received"] and statuses(ctx)[-1] == "failed"
    assert serving.engine.bundle.manifest.version == "1.0.0"


def test_an_mcu_file_with_no_mcu_attached_is_skipped_and_said(fleet, tmp_path):
    ctx, serving, up, v1, v2, key = fleet

    class NoMcu:
        attached = None

        async def push_file(self, name, blob, bundle):  # pragma: no cover - never called
            raise AssertionError("no MCU attached")

    up.mcu = NoMcu()
    m = json.loads((v2 / "manifest.json").read_text())
    (v2 / "fw.bin").write_bytes(b"\x01" * 64)
    m["files"]["fw.bin"] = {"role": "mcu"}
    from protocol.bundle import write_manifest

    write_manifest(v2, m)
    data, _ = make_patch(v1, v2, key)
    man, offer = offer_for(v1, v2, data)

    async def main():
        await up.on_offer(offer, Message(CMD, b""))
        for i in range(man.count):
            await up.on_chunk(chunk(man, data, i), Message(CMD, b""))

    asyncio.run(main())
    assert statuses(ctx)[-1] == "applied" and ctx.named("mcu.model.skipped")[0]["files"] == ["fw.bin"]


# -- the federated participant ------------------------------------------------------------
class RecordingTrainer:
    def __init__(self, n=10):
        self.n, self.calls = n, []

    def labelled_count(self):
        return self.n

    def train_from(self, start, **kw):
        from agent.learning.federated import LocalResult

        self.calls.append(kw)
        return LocalResult({k: v + 0.5 for k, v in start.items()}, self.n, 0.25, 0.01, kw["steps"])


def task_frame(**body):
    b = {"run_id": "run-1", "round": 1, "base_version": 0, "steps": 5, "lr": 0.1, "batch_size": 8,
         "deadline_ts": time.time() + 60, **body}
    env = Envelope(kind="fl.task", sender="controller", body=b)
    return Frame(env, {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}, b"")


def test_a_task_is_trained_from_the_global_head_and_only_the_delta_is_sent(tmp_path):
    ctx = FakeContext(state={"dir": str(tmp_path)})
    trainer = RecordingTrainer()
    p = Participant(ctx, trainer, {"w": (2, 3), "b": (3,)})
    asyncio.run(p.on_task(task_frame(prox_mu=0.1, dp={"clip": 0.5}), Message(CMD, b"")))
    (sent,) = ctx.on("/data/fl")
    assert sent.reliable and sent.body["round"] == 1 and sent.body["encoding"] == "raw"
    assert trainer.calls[0]["prox_mu"] == 0.1 and trainer.calls[0]["steps"] == 5
    assert sent.body["update_norm"] > 0.5                      # measured before the clip to 0.5
    from protocol.binary import decode_frame

    delta = decode_frame(sent.payload).tensors
    norm = float(np.sqrt(sum(float(np.sum(v ** 2)) for v in delta.values())))
    assert norm == pytest.approx(0.5, rel=1e-5)


def test_tasks_that_cannot_be_done_are_refused_with_a_reason_and_never_twice(tmp_path):
    ctx = FakeContext(state={"dir": str(tmp_path)})
    p = Participant(ctx, RecordingTrainer(), {"w": (2, 3), "b": (3,)})
    asyncio.run(p.on_task(task_frame(), Message(CMD, b"")))
    asyncio.run(p.on_task(task_frame(), Message(CMD, b"")))                      # the same round again
    asyncio.run(p.on_task(task_frame(round=2, deadline_ts=time.time() - 1), Message(CMD, b"")))
    bad = task_frame(round=3)
    bad.tensors["w"] = np.zeros((4, 4), np.float32)
    asyncio.run(p.on_task(bad, Message(CMD, b"")))
    reasons = [e["reason"] for e in ctx.named("fl.task_refused")]
    assert len(ctx.on("/data/fl")) == 1 and len(reasons) == 3
    assert "already trained" in reasons[0] and "deadline" in reasons[1] and "shape" in reasons[2]
    again = Participant(ctx, RecordingTrainer(), {"w": (2, 3), "b": (3,)})          # a restart remembers
    asyncio.run(again.on_task(task_frame(), Message(CMD, b"")))
    assert "already trained" in ctx.named("fl.task_refused")[-1]["reason"]
    assert ctx.rejected["fl_task_refused"] == 4


# -- the learning feature -----------------------------------------------------------------
@pytest.fixture
def learning(tmp_path, example_bundle):
    ctx = FakeContext(state={"dir": str(tmp_path)}, model={"bundle": str(example_bundle[0])},
                      learning={"federated": True})
    serving = Serving(ctx)
    serving.start()
    a = Adaptation(ctx, serving)
    a.start()
    return ctx, serving, a


def test_learning_declares_its_commands_and_kinds_only_with_a_trainable_head(learning, tmp_path):
    ctx, serving, a = learning
    assert {"learn.start", "learn.stop", "learn.now", "learn.status"} == set(a.commands())
    assert set(a.request_kinds()) == {"feedback"} and set(a.control_kinds()) == {"fl.task", "fl.ack", "fl.head", "fl.secagg"}
    bare = Adaptation(FakeContext(state={"dir": str(tmp_path / "b")}), Serving(FakeContext()))
    bare.start()                                            # nothing served: nothing declared
    assert bare.commands() == {} and bare.control_kinds() == {} and bare.tasks() == []


def test_served_predictions_feed_the_learner_and_feedback_labels_them(learning, digits_test):
    ctx, serving, a = learning
    x, y = digits_test
    env = Envelope(kind="infer.request", sender="app", body={"x": x[0].tolist()}, corr="q1")
    asyncio.run(serving.handle_request(env, Message("edgefleet/v1/dev/pi-t/req", encode(env))))
    assert a.learner.samples_seen == 1
    fb = Envelope(kind="feedback", sender="app", body={"request_id": "q1", "label": int(y[0])})
    asyncio.run(a.on_feedback(fb, Message("edgefleet/v1/dev/pi-t/req", b"")))
    unknown = Envelope(kind="feedback", sender="app", body={"request_id": "nope", "label": 1})
    asyncio.run(a.on_feedback(unknown, Message("edgefleet/v1/dev/pi-t/req", b"")))
    (_, ok), (_, refused) = ctx.replies[1:]
    assert ok["ok"] and ok["labelled"] == 1 and not refused["ok"] and refused["error"]
    assert ctx.rejected == {"bad_feedback": 1}


def test_a_global_head_of_the_wrong_shape_is_refused_and_the_serving_head_stays(learning):
    ctx, serving, a = learning
    before = {k: v.copy() for k, v in serving.engine.head.items()}
    env = Envelope(kind="fl.head", sender="controller", body={"version": 2, "run_id": "r"})
    bad = Frame(env, {k: np.zeros((3, 3), np.float32) for k in before}, b"")
    asyncio.run(a.on_global_head(bad, Message(CMD, b"")))
    assert ctx.rejected == {"bad_global_head": 1} and ctx.named("fl.head_refused")
    assert all(np.array_equal(serving.engine.head[k], v) for k, v in before.items())
    good = Frame(env, {k: (v + 1).astype(np.float32) for k, v in before.items()}, b"")
    asyncio.run(a.on_global_head(good, Message(CMD, b"")))
    assert ctx.named("fl.head_applied")[0]["version"] == 2
    assert all(np.allclose(serving.engine.head[k], v + 1) for k, v in before.items())


def test_a_repeated_offer_does_not_ask_again_for_chunks_in_flight(fleet):
    """A new rollout owner (a replica's takeover, a restarted controller) offers the same transfer
    again. The chunks already asked for may still be on their way (the dead owner sent them, the
    broker holds them): asking again at once would have them served twice. They are asked again only
    when their request times out, as any lost chunk is (issue 14: no chunk served twice)."""
    ctx, serving, up, v1, v2, key = fleet
    data, _ = make_patch(v1, v2, key, deltas=False)
    man, offer = offer_for(v1, v2, data, chunk_size=1024)
    assert man.count >= 3

    async def main():
        await up.on_offer(offer, Message(CMD, b""))
        first = [i for p in ctx.on("/data/xfer") for i in p.body["chunks"]]
        await up.on_chunk(chunk(man, data, first[0]), Message(CMD, b""))
        n = len(ctx.on("/data/xfer"))
        await up.on_offer(offer, Message(CMD, b""))          # the same transfer, offered again
        again = [i for p in ctx.on("/data/xfer")[n:] for i in p.body["chunks"]]
        assert not set(again) & set(first[1:]), (first, again)
        for i in up.active.transfer.inflight:                   # their requests time out: asked again
            up.active.transfer.inflight[i] = -1e9
        up._ask()
        later = [i for p in ctx.on("/data/xfer")[n:] for i in p.body["chunks"]]
        assert later and set(later) <= set(first[1:]), (first, later)   # (the window shrinks after a loss)

    asyncio.run(main())


def test_a_patch_of_the_federated_layers_is_applied_on_the_board(tmp_path, example_bundle):
    """Issue 20: a run over chosen layers (``trainable: ["dense1"]``) ships as a patch of those
    tensors only; the board rebuilds head.npz from its own copy, checks it against the signed
    manifest, installs it through the gate. The bytes, measured against the whole-file patch."""
    from controller.modeltools.example import derive_bundle
    from protocol.bundle import load_head
    from tests.protocol.test_npzdelta import _two_layer_base

    a, head = _two_layer_base(example_bundle[0], tmp_path / "a")
    b = derive_bundle(a, tmp_path / "b", "1.1.0", {**head, "dense1.weight": head["dense1.weight"] * 0.8,
                                                    "dense1.bias": head["dense1.bias"] + 0.05})
    key = generate()
    save_keypair(key, tmp_path / "k.pem", tmp_path / "k.pub")
    ctx = FakeContext(state={"dir": str(tmp_path / "state")}, model={"bundle": str(a)},
                      security={"trusted_keys": [str(tmp_path / "k.pub")]})
    serving = Serving(ctx)
    serving.start()
    up = Updater(ctx, serving)
    up.start()
    data, pm = make_patch(a, b, key)
    whole, _ = make_patch(a, b, key, deltas=False)
    assert sorted(pm["files"]["head.npz"]["delta"]["changed"]) == ["dense1.bias", "dense1.weight"]
    assert len(data) * 2 < len(whole), (len(data), len(whole))
    man = make_manifest("t-1", data, 4096)
    body = {"rollout_id": "r1", "target": {"version": "1.1.0", "bundle_sha256": bundle_id(b)},
            "base": {"version": "1.0.1", "bundle_sha256": bundle_id(a)}, "transfer": man.to_dict()}

    async def main():
        await up.on_offer(Envelope(kind="model.offer", sender="controller", body=body), Message(CMD, b""))
        for i in range(man.count):
            await up.on_chunk(chunk(man, data, i), Message(CMD, b""))

    asyncio.run(main())
    assert statuses(ctx)[-1] == "applied", ctx.named("model.update")
    assert serving.engine.bundle.manifest.version == "1.1.0"
    installed = serving.store.current
    assert (installed / "head.npz").read_bytes() == (b / "head.npz").read_bytes()
    got = load_head(installed / "head.npz")
    assert np.array_equal(got["dense0.weight"], head["dense0.weight"])          # the frozen body kept
    assert np.allclose(got["dense1.weight"], head["dense1.weight"] * 0.8)       # the federated layer new
