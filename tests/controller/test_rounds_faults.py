"""Rounds under faults, pure (issue 15, items 1-2): no broker, a real SQLite store.

Item 1: a sync round closes before its deadline only when every selected device answered;
looking offline (a last will, a broker restart) never closes it; reasons say what happened;
a run that did not reach its rounds is not ``done``.
Item 2: "sent" in the store means the broker acknowledged it; an ``fl.ack`` lost in a crash is
sent again; a duplicate update is answered with the verdict recorded the first time.
"""
from __future__ import annotations

import concurrent.futures
from types import SimpleNamespace

import numpy as np
import pytest

from controller.channel import ControlChannel
from controller.fl.engine import RunConfig
from controller.fl.runner import RoundRunner
from protocol.binary import decode_frame, is_frame
from protocol.envelope import decode
from protocol.topics import Topics

from tests.controller.test_rounds import G, clients, delta, new_run
from tests.controller.test_rounds import store  # noqa: F401 - the fixture


def started(eng, now=0.0, ids=("a", "b")):
    tasks, _ = eng.step(now, clients(*ids))
    for t in tasks:
        eng.task_sent(t)
    return tasks


# -- item 1: the deadline is the deadline ---------------------------------------------------
def test_devices_looking_offline_never_close_a_round_before_its_deadline(store):
    eng = new_run(store, rounds=1, clients=2, min_clients=2, deadline_s=60)
    started(eng)
    # a broker restart: every device's last will says offline, 5 s into a 60 s deadline
    assert eng.step(5.0, clients("a", "b", online=False)) == ([], [])
    assert store.round("r1", 1).status == "running"
    # the updates queued during the outage arrive before the deadline: they count
    assert eng.on_update(20.0, "a", 1, 0, 10, delta(1.0), {}).accepted
    assert eng.on_update(21.0, "b", 1, 0, 10, delta(3.0), {}).accepted
    _, outs = eng.step(21.5, clients("a", "b"))
    assert [o.status for o in outs] == ["aggregated"] and outs[0].new_version == 1
    assert store.run("r1").status == "done"


def test_a_round_closes_early_when_every_selected_device_answered_even_refused(store):
    eng = new_run(store, rounds=1, clients=2, min_clients=1, deadline_s=60)
    started(eng)
    bad = {"dense0.weight": np.full((2, 2), np.nan, np.float32), "dense0.bias": np.zeros(2, np.float32)}
    assert not eng.on_update(1.0, "a", 1, 0, 10, bad, {}).accepted
    assert eng.step(2.0, clients("a", "b")) == ([], [])            # b has not answered yet
    assert eng.on_update(3.0, "b", 1, 0, 10, delta(1.0), {}).accepted
    _, outs = eng.step(3.5, clients("a", "b"))
    assert outs[0].status == "aggregated" and outs[0].metrics["closed"] == "all selected devices answered"
    assert outs[0].metrics["dropped"] == []


def test_a_missing_device_waits_for_the_deadline_and_its_reason_is_true(store):
    eng = new_run(store, rounds=1, clients=3, min_clients=2, deadline_s=10)
    started(eng, ids=("a", "b", "c"))
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    eng.on_update(1.0, "b", 1, 0, 10, delta(1.0), {})
    assert eng.step(2.0, clients("a", "b") + clients("c", online=False)) == ([], [])
    _, outs = eng.step(10.0, clients("a", "b") + clients("c", online=False))
    m = outs[0].metrics
    assert outs[0].status == "aggregated" and m["dropped"] == ["c"] and m["closed"] == "deadline"
    assert {f["device"]: f["reason"] for f in m["failures"]} == {"c": "no update by the deadline (offline at the deadline)"}


def test_quorum_reasons_say_why_the_round_closed(store):
    eng = new_run(store, rounds=2, clients=2, min_clients=2, deadline_s=10)
    started(eng)
    bad = {"dense0.weight": np.full((2, 2), np.nan, np.float32), "dense0.bias": np.zeros(2, np.float32)}
    eng.on_update(1.0, "a", 1, 0, 10, bad, {})
    eng.on_update(2.0, "b", 1, 0, 10, delta(1.0), {})
    _, outs = eng.step(3.0, clients("a", "b"))
    reason = outs[0].metrics["reason"]
    assert outs[0].status == "failed" and "by the deadline" not in reason
    assert reason == "quorum not met: 1 of 2 accepted updates; every selected device answered before the deadline"
    tasks, _ = eng.step(3.5, clients("a", "b"))
    for t in tasks:
        eng.task_sent(t)
    _, outs = eng.step(14.0, clients("a", "b"))
    assert outs[0].metrics["reason"] == "quorum not met: 0 of 2 accepted updates by the deadline"


def test_a_round_does_not_close_while_the_controller_cannot_hear_the_fleet(store):
    eng = new_run(store, rounds=1, clients=2, min_clients=2, deadline_s=10)
    started(eng)
    assert eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {}).accepted
    # the controller's own link is down across the deadline: nothing is decided blind
    assert eng.step(11.0, clients("a", "b"), link_up_since=None) == ([], [])
    # back at 12 s: b's update, sent at 9 s, was queued by the broker for us and counts
    assert eng.on_update(12.1, "b", 1, 0, 10, delta(1.0), {}, sent_ts=9.0).accepted
    late = eng.on_update(12.2, "c", 1, 0, 10, delta(1.0), {}, sent_ts=9.0)
    assert not late.accepted                                    # c was never selected
    _, outs = eng.step(12.5, clients("a", "b"), link_up_since=12.0)
    assert outs[0].status == "aggregated" and outs[0].metrics["received"] == 2


def test_an_update_sent_after_the_deadline_is_late(store):
    eng = new_run(store, rounds=1, clients=3, min_clients=1, deadline_s=10)
    started(eng, ids=("a", "b", "c"))
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    assert eng.step(11.0, clients("a", "b", "c"), link_up_since=None) == ([], [])
    v = eng.on_update(12.1, "b", 1, 0, 10, delta(1.0), {}, sent_ts=10.5)
    assert not v.accepted and "late" in v.reason
    # the settling time after a reconnect: the broker's queue for us drains first (c may be in it)
    assert eng.step(12.5, clients("a", "b", "c"), link_up_since=12.4) == ([], [])
    _, outs = eng.step(15.0, clients("a", "b", "c"), link_up_since=12.4)
    assert outs[0].status == "aggregated" and outs[0].metrics["closed"] == "deadline"


def test_a_run_that_did_not_reach_its_rounds_is_partial_or_failed(store):
    eng = new_run(store, rounds=2, clients=2, min_clients=2, deadline_s=10)
    started(eng)
    eng.on_update(1.0, "a", 1, 0, 10, delta(1.0), {})
    eng.on_update(1.0, "b", 1, 0, 10, delta(1.0), {})
    eng.step(2.0, clients("a", "b"))                            # round 1 aggregated, round 2 starts
    for t in eng.step(2.5, clients("a", "b"))[0]:
        eng.task_sent(t)
    eng.step(13.0, clients("a", "b"))                           # round 2: nothing by the deadline
    eng.step(13.5, clients("a", "b"))
    run = store.run("r1")
    assert run.status == "partial" and run.global_version == 1 and run.error == "1 of 2 rounds aggregated"
    assert eng.step(14.0, clients("a", "b")) == ([], [])        # partial is final

    eng2 = new_run(store, "r2", rounds=1, clients=2, min_clients=2, deadline_s=10)
    started(eng2)
    eng2.step(11.0, clients("a", "b"))
    eng2.step(11.5, clients("a", "b"))
    assert store.run("r2").status == "failed" and "no round aggregated" in store.run("r2").error


@pytest.mark.parametrize("status,code", [("done", 0), ("failed", 1), ("cancelled", 1), ("partial", 3)])
def test_round_start_wait_exits_non_zero_unless_done(store, status, code, capsys):
    from controller.cli.round import _follow

    store.create_run("r1", RunConfig(rounds=2, clients=2).to_dict(), G)
    store.update_run("r1", status=status)
    with pytest.raises(SystemExit) as exc:
        _follow(store, "r1", as_json=True)
    assert exc.value.code == code


# -- item 2: "sent" means acknowledged by the broker ----------------------------------------
class Broker:
    """A publish function whose acknowledgements the test hands out (the PUBACKs)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, concurrent.futures.Future]] = []
        self.up = True

    def publish_acked(self, topic, payload, qos=1, retain=False):
        fut: concurrent.futures.Future = concurrent.futures.Future()
        if not self.up:
            fut.set_result(False)
        self.sent.append((topic, payload, fut))
        return fut

    def frames(self, kind):
        return [(t, decode_frame(p), f) for t, p, f in self.sent if is_frame(p) and decode_frame(p).envelope.kind == kind]

    def envelopes(self, kind):
        return [(t, decode(p), f) for t, p, f in self.sent if not is_frame(p) and decode(p).kind == kind]


def runner_for(store, broker, devices=("a", "b")):
    channel = ControlChannel(Topics(), "ctl", lambda *a, **k: True, connected=lambda: broker.up,
                             publish_acked=broker.publish_acked)
    devs = [SimpleNamespace(id=d, online=True, telemetry={"learning": {"labelled_samples": 100}}, last_seen=1e12,
                            group=None, state={}) for d in devices]
    registry = SimpleNamespace(db=store.db, devices=lambda: devs, commit=lambda: None)
    cfg = SimpleNamespace(controller=SimpleNamespace(id="ctl"), mqtt=SimpleNamespace(max_frame_bytes=1 << 24))
    return RoundRunner(channel, registry, store, None, cfg, reject=lambda *a: None, clock=lambda: 1e12)


def test_a_task_is_marked_sent_only_when_the_broker_acknowledged_it(store):
    broker = Broker()
    store.create_run("r1", RunConfig(rounds=1, clients=2, min_clients=2, deadline_s=60).to_dict(), G)
    runner = runner_for(store, broker)
    runner.tick(1e12)
    assert sorted(t for t, _, _ in broker.frames("fl.task")) == [Topics().bin("a"), Topics().bin("b")]
    assert store.round("r1", 1).tasks_sent == frozenset()      # handed to paho is not sent
    runner.tick(1e12 + 0.5)
    assert len(broker.frames("fl.task")) == 2                   # in flight: not published twice
    (ta, _, fa), (tb, _, fb) = sorted(broker.frames("fl.task"), key=lambda x: x[0])
    fa.set_result(True)
    assert store.round("r1", 1).tasks_sent == frozenset({"a"})
    fb.set_result(False)                                        # the link went down before the PUBACK
    runner.tick(1e12 + 1)
    again = [t for t, _, _ in broker.frames("fl.task")]
    assert len(again) == 3 and again[-1] == Topics().bin("b")  # re-sent, because it was not acknowledged
    broker.frames("fl.task")[-1][2].set_result(True)
    assert store.round("r1", 1).tasks_sent == frozenset({"a", "b"})


def update_message(run_id, dev, round_no=1, base=0, value=1.0):
    from protocol.binary import encode_frame
    from protocol.envelope import Envelope
    from protocol.mqttlink import Message

    env = Envelope(kind="fl.update", sender=dev, body={"run_id": run_id, "round": round_no, "base_version": base,
                                                       "num_samples": 10, "encoding": "raw"})
    return Message(Topics().data(dev, "fl"), encode_frame(env, delta(value)), 1)


def test_a_duplicate_update_is_answered_with_the_recorded_verdict(store):
    broker = Broker()
    store.create_run("r1", RunConfig(rounds=1, clients=2, min_clients=2, deadline_s=86400).to_dict(), G)
    runner = runner_for(store, broker)
    runner.tick(1e12)
    runner.on_update_message("a", update_message("r1", "a"))
    runner.on_update_message("a", update_message("r1", "a"))   # the device never got our ack: it re-sends
    acks = [e.body for _, e, _ in broker.envelopes("fl.ack")]
    assert [a["accepted"] for a in acks] == [True, True] and acks[0]["reason"] == acks[1]["reason"] == "accepted"
    assert len(store.updates("r1", 1)) == 1


def test_an_ack_never_acknowledged_is_sent_again_by_a_restarted_controller(store):
    broker = Broker()
    store.create_run("r1", RunConfig(rounds=1, clients=2, min_clients=2, deadline_s=86400).to_dict(), G)
    runner = runner_for(store, broker)
    runner.tick(1e12)
    runner.on_update_message("a", update_message("r1", "a"))
    (_, ack, fut), = broker.envelopes("fl.ack")
    # killed before the PUBACK of the ack: a new runner over the same store
    broker2 = Broker()
    runner_for(store, broker2).tick(1e12 + 1)
    [(topic, env, fut2)] = broker2.envelopes("fl.ack")
    assert topic == Topics().cmd("a") and env.body == ack.body
    fut2.set_result(True)
    runner3 = runner_for(store, Broker())
    runner3.tick(1e12 + 2)
    assert runner3.channel._publish_acked.__self__.envelopes("fl.ack") == []   # acknowledged: never again
