"""Serving and the Offloader as features on a recording context: real ONNX Runtime, no broker."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from agent.core.context import CommandError
from agent.offload.feature import Offloader
from agent.offload.policy import OffloadPolicy
from agent.serving.feature import Serving
from protocol.binary import decode_frame
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message

from .fake_context import FakeContext


def request(x, **body) -> tuple[Envelope, Message]:
    env = Envelope(kind="infer.request", sender="app", body={"x": x, **body}, corr="r1")
    return env, Message("edgefleet/v1/dev/pi-t/req", encode(env))


@pytest.fixture
def serving(tmp_path, example_bundle):
    ctx = FakeContext(state={"dir": str(tmp_path)}, model={"bundle": str(example_bundle[0])})
    s = Serving(ctx, runtimes=["onnxruntime"])
    s.start()
    return ctx, s


def test_serving_installs_the_configured_bundle_and_declares_what_it_serves(serving):
    ctx, s = serving
    assert s.engine is not None
    assert ctx.named("model.installed") and not ctx.named("model.refused")
    assert set(s.commands()) == {"model.describe", "model.rollback"}
    assert set(s.request_kinds()) == {"infer.request"}
    assert s.state_fields()["model"]["version"] == "1.0.0"
    assert dict(s.tasks()).keys() == {"results"}            # no source configured
    assert s.telemetry()["requests"] == 0


def test_a_request_is_answered_locally_without_a_resolver_and_a_bad_one_gets_an_error(serving, digits_test):
    ctx, s = serving
    x, y = digits_test
    asyncio.run(s.handle_request(*request(x[0].tolist())))
    asyncio.run(s.handle_request(*request([1.0, 2.0])))
    (_, good), (_, bad) = ctx.replies
    assert good["ok"] and good["result"]["path"] == "local" and good["result"]["label"] == int(
        s.engine.predict(x[0]).label)
    assert not bad["ok"] and "shape" in bad["error"]
    assert ctx.rejected == {"bad_request": 1} and s.telemetry()["request_errors"] == 1


def test_observers_and_taps_see_every_served_prediction(serving, digits_test):
    ctx, s = serving
    x, _ = digits_test
    seen, tapped = [], []
    s.observers.append(lambda sid, pred, label: seen.append((sid, label)))
    s.taps.append(lambda xx, label: tapped.append(label))
    asyncio.run(s.handle_request(*request(x[1].tolist(), label=3)))
    assert seen == [("r1", 3)] and len(tapped) == 1


def test_health_check_returns_its_figures(serving, example_bundle):
    ctx, s = serving
    figures = s.health_check(example_bundle[0])
    assert isinstance(figures, dict) and figures                         # a return value, not a side channel


def test_rollback_command_names_what_is_missing(serving):
    ctx, s = serving
    with pytest.raises(CommandError, match="not installed here"):
        s._cmd_rollback({"version": "9.9.9"}, Envelope(kind="cmd", sender="ops", body={}))
    with pytest.raises(CommandError, match="no previous version"):
        s._cmd_rollback({}, Envelope(kind="cmd", sender="ops", body={}))


def test_no_model_is_a_clear_error_reply(tmp_path, digits_test):
    ctx = FakeContext(state={"dir": str(tmp_path)})
    s = Serving(ctx)
    s.start()
    asyncio.run(s.handle_request(*request(digits_test[0][0].tolist())))
    assert not ctx.replies[0][1]["ok"] and "no model" in ctx.replies[0][1]["error"]
    assert s.state_fields() == {}


# -- the offloader ------------------------------------------------------------------------
def make_offloader(ctx, s, **policy):
    return Offloader(ctx, OffloadPolicy(**{"enabled": True, "threshold": 1.0, "deadline_ms": 5000.0, **policy}),
                     engine=lambda: s.engine)


def test_offloaded_request_carries_features_and_the_remote_answer_wins(serving, digits_test):
    ctx, s = serving
    off = make_offloader(ctx, s)
    s.resolver = off
    x, _ = digits_test

    async def main():
        task = asyncio.ensure_future(s.handle_request(*request(x[2].tolist())))
        while not ctx.on("/offload/req") and not task.done():
            await asyncio.sleep(0)
        sent = ctx.on("/offload/req")[0]
        frame = decode_frame(sent.payload)
        assert frame.envelope.body["mode"] == "features" and frame.tensors["x"].dtype == np.uint8
        reply = Envelope(kind="offload.reply", sender="w1", corr=frame.envelope.corr,
                         body={"ok": True, "label": 7, "confidence": 0.99, "worker": "w1"})
        await off.subscriptions()[0].handler(Message(off.reply_topic, encode(reply)))
        await task

    asyncio.run(main())
    result = ctx.replies[0][1]["result"]
    assert result["path"] == "remote" and result["label"] == 7 and result["worker"] == "w1"
    assert off.telemetry()["remote_ok"] == 1 and off.telemetry()["offloaded"] == 1


def test_no_answer_before_the_deadline_falls_back_to_the_local_answer(serving, digits_test):
    ctx, s = serving
    off = make_offloader(ctx, s, deadline_ms=30.0, margin_ms=1.0)
    s.resolver = off
    asyncio.run(s.handle_request(*request(digits_test[0][3].tolist())))
    result = ctx.replies[0][1]["result"]
    assert result["path"] == "local_fallback" and "deadline" in result["offload_error"]
    assert off.telemetry()["timeouts"] == 1


def test_link_down_answers_locally_and_says_why(serving, digits_test):
    ctx, s = serving
    ctx.connected = False
    off = make_offloader(ctx, s)
    s.resolver = off
    asyncio.run(s.handle_request(*request(digits_test[0][4].tolist())))
    result = ctx.replies[0][1]["result"]
    assert result["path"] == "local" and result["offload_skipped"] == "link down"


def test_stray_replies_and_wrong_kinds_are_counted(serving):
    ctx, s = serving
    off = make_offloader(ctx, s)
    handler = off.subscriptions()[0].handler
    late = Envelope(kind="offload.reply", sender="w1", corr="gone",
                    body={"ok": True, "label": 1, "confidence": 1.0, "worker": "w1"})
    wrong = Envelope(kind="event", sender="w1", body={"event": "x", "level": "info"})
    asyncio.run(handler(Message(off.reply_topic, encode(late))))
    asyncio.run(handler(Message(off.reply_topic, encode(wrong))))
    asyncio.run(handler(Message(off.reply_topic, b"not json")))
    assert off.telemetry()["duplicate_replies"] == 1
    assert ctx.rejected.get("unexpected_kind") == 1 and sum(ctx.rejected.values()) == 2


def test_offload_set_validates_persists_and_reports(serving, tmp_path):
    ctx, s = serving
    off = make_offloader(ctx, s)
    cmd = off.commands()["offload.set"]
    env = Envelope(kind="cmd", sender="ops", body={})
    assert cmd({"threshold": 0.5}, env)["threshold"] == 0.5
    with pytest.raises(CommandError, match="unknown offload settings"):
        cmd({"bogus": 1}, env)
    with pytest.raises(CommandError, match="bad offload policy"):
        cmd({"threshold": 2.0}, env)
    assert json.loads((tmp_path / "offload_policy.json").read_text())["threshold"] == 0.5
    assert ctx.named("offload.policy")[0]["threshold"] == 0.5
    again = make_offloader(ctx, s)                                   # a restart keeps the set policy
    assert again.policy.threshold == 0.5
