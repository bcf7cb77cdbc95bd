"""The log ring and the rate-limited stream (no broker: a recording context)."""
from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from agent.logs.feature import RemoteLogs
from agent.logs.ring import LogRing, level_no
from protocol.topics import Topics


def test_ring_is_bounded_and_filters():
    ring = LogRing(capacity=5)
    lg = logging.getLogger("test.ring")
    lg.addHandler(ring)
    lg.setLevel(logging.DEBUG)
    try:
        for i in range(8):
            lg.log(logging.WARNING if i % 2 else logging.INFO, "rec %d", i)
    finally:
        lg.removeHandler(ring)
    assert [r["msg"] for r in ring.since()] == [f"rec {i}" for i in range(3, 8)] and ring.evicted == 3
    assert [r["msg"] for r in ring.since(min_level=level_no("warning"))] == ["rec 3", "rec 5", "rec 7"]
    with pytest.raises(ValueError):
        level_no("loud")


def test_follow_stream_is_rate_limited_and_counts_what_it_skips():
    sent: list[dict] = []
    ctx = SimpleNamespace(device_id="pi-1", topics=Topics(), cfg=SimpleNamespace(mqtt=SimpleNamespace(
        max_message_bytes=256 * 1024)), publish=lambda t, p, qos=0: sent.append(json.loads(p)) or True)

    async def main() -> RemoteLogs:
        feat = RemoteLogs(ctx, rate_per_s=0.001, burst=2, batch_s=0.01, max_records_per_msg=1)
        feat.start()
        task = asyncio.create_task(feat._stream())
        feat._follow({"for_s": 30, "level": "info"}, None)
        lg = logging.getLogger("edge_agent.chatty")
        lg.setLevel(logging.INFO)
        for i in range(10):
            lg.info("line %d", i)
        await asyncio.sleep(0)
        while feat.streamed + feat.dropped < 10:
            await asyncio.sleep(0.01)
        task.cancel()
        return feat

    feat = asyncio.run(main())
    logging.getLogger().removeHandler(feat.ring)
    assert len(sent) == 2 and feat.streamed == 2 and feat.dropped == 8     # burst 2, then nothing for ages
    assert feat.telemetry()["dropped_by_rate_limit"] == 8
    assert len(feat.ring.since()) >= 10      # skipped records stay in the ring
