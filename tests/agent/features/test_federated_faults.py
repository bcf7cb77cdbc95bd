"""The device side of a round under controller crashes (issue 15, item 2): an update the
controller never acknowledged with ``fl.ack`` is sent again until it is, and a repeated
``fl.ack`` is counted once."""
from __future__ import annotations

import asyncio

from agent.learning.federated import Participant
from protocol.envelope import Envelope
from protocol.mqttlink import Message

from .fake_context import FakeContext
from .test_updates_learning import CMD, RecordingTrainer, task_frame


def ack(accepted=True, round_no=1):
    return Envelope(kind="fl.ack", sender="controller",
                    body={"run_id": "run-1", "round": round_no, "accepted": accepted, "reason": "accepted"})


def test_an_update_is_sent_again_until_the_controller_acks_it(tmp_path):
    ctx = FakeContext(state={"dir": str(tmp_path)})
    p = Participant(ctx, RecordingTrainer(), {"w": (2, 3), "b": (3,)})
    p.resend_s = 0.05

    async def main():
        await p.on_task(task_frame(), Message(CMD, b""))
        first = ctx.on("/data/fl")[0].payload
        for _ in range(200):                          # the controller crashed before acking: re-sent
            if len(ctx.on("/data/fl")) >= 3:
                break
            await asyncio.sleep(0.01)
        sent = ctx.on("/data/fl")
        assert len(sent) >= 3 and all(s.payload == first for s in sent)   # the same update, byte for byte
        ctx.connected = False                         # no re-sends into a dead link
        n = len(ctx.on("/data/fl"))
        await asyncio.sleep(0.15)
        assert len(ctx.on("/data/fl")) == n
        ctx.connected = True
        await p.on_ack(ack(), Message(CMD, b""))
        await p.on_ack(ack(), Message(CMD, b""))      # the restarted controller acks again
        n = len(ctx.on("/data/fl"))
        await asyncio.sleep(0.15)
        assert len(ctx.on("/data/fl")) == n           # acknowledged: never again
        assert p.stats["accepted"] == 1 and len(ctx.named("fl.update_accepted")) == 1

    asyncio.run(main())


def test_re_sending_stops_when_the_round_is_long_over(tmp_path):
    import time

    ctx = FakeContext(state={"dir": str(tmp_path)})
    p = Participant(ctx, RecordingTrainer(), {"w": (2, 3), "b": (3,)})
    p.resend_s, p.resend_grace_s = 0.05, 0.0

    async def main():
        await p.on_task(task_frame(deadline_ts=time.time() + 0.8), Message(CMD, b""))
        await asyncio.sleep(1.2)
        n = len(ctx.on("/data/fl"))
        await asyncio.sleep(0.2)
        assert len(ctx.on("/data/fl")) == n and not p.unacked

    asyncio.run(main())
