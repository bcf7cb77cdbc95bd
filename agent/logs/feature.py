"""Remote logs: ``logs.get`` answers from the ring; ``logs.follow`` streams new records to
``dev/{id}/reply/logs`` while someone follows (a lease each follower renews).

Flood control for a cellular link: records are batched (one message per ``batch_s``) and
messages pass a token bucket (``rate_per_s``, ``burst``). When the bucket is empty the records
of that batch are *not sent* — they stay in the ring (``logs.get`` still has them) — and the
next message that goes out says how many were skipped (``dropped``); the total is in telemetry.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

from protocol.envelope import Envelope, encode

from ..core.context import CommandError, Feature
from ..core.ratelimit import TokenBucket
from .ring import LogRing, attach, level_no

MAX_FOLLOW_S = 300.0


class RemoteLogs(Feature):
    name = "logs"

    def __init__(self, ctx: Any, capacity: int = 2000, rate_per_s: float = 2.0, burst: float = 5.0,
                 batch_s: float = 0.25, max_records_per_msg: int = 100) -> None:
        self.ctx = ctx
        self.ring = LogRing(capacity, exclude=("edge_agent.logs",))
        self.bucket = TokenBucket(rate_per_s, burst)
        self.batch_s = batch_s
        self.max_records = max_records_per_msg
        self.follow_until = 0.0
        self.follow_level = 0
        self.dropped = 0          # records skipped by the rate limit, total
        self._unsent_drops = 0    # ... not yet reported in a message
        self.streamed = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=10000)

    def start(self) -> None:
        attach(self.ring, self)

    def commands(self) -> dict[str, Any]:
        return {"logs.get": self._get, "logs.follow": self._follow}

    def telemetry(self) -> dict[str, Any]:
        return {"ring": len(self.ring.records), "evicted": self.ring.evicted, "streamed": self.streamed,
                "dropped_by_rate_limit": self.dropped, "following": self.follow_until > time.time()}

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [("logs-stream", self._stream)]

    # -- commands ----------------------------------------------------------------
    def _get(self, args: dict[str, Any], env: Any) -> dict[str, Any]:
        try:
            lvl = level_no(args.get("level"))
            since = float(args.get("since_s", 0) or 0)
            limit = max(1, min(int(args.get("limit", 500)), 1000))
        except (TypeError, ValueError) as exc:
            raise CommandError(f"logs.get: {exc}") from None
        ts = time.time() - since if since > 0 else 0.0
        recs = self.ring.since(ts, lvl, limit)
        budget = self.ctx.cfg.mqtt.max_message_bytes // 2     # stay well inside one message
        out, size = [], 0
        for r in reversed(recs):
            size += len(r["msg"]) + 100
            if size > budget:
                break
            out.append(r)
        out.reverse()
        return {"records": out, "truncated": len(out) < len(recs), "evicted": self.ring.evicted,
                "capacity": self.ring.capacity}

    def _follow(self, args: dict[str, Any], env: Any) -> dict[str, Any]:
        try:
            for_s = max(1.0, min(float(args.get("for_s", 30)), MAX_FOLLOW_S))
            self.follow_level = level_no(args.get("level"))
        except (TypeError, ValueError) as exc:
            raise CommandError(f"logs.follow: {exc}") from None
        self.follow_until = time.time() + for_s
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self.ring.listen(self._on_record)
        return {"topic": self.ctx.topics.reply(self.ctx.device_id, "logs"), "until": round(self.follow_until, 3)}

    def _on_record(self, rec: dict[str, Any]) -> None:
        loop = self._loop
        if loop is None or self.follow_until < rec["ts"] or rec["levelno"] < self.follow_level:
            return
        try:
            loop.call_soon_threadsafe(self._enqueue, rec)
        except RuntimeError:   # loop closed at shutdown
            pass

    def _enqueue(self, rec: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(rec)
        except asyncio.QueueFull:
            self.dropped += 1
            self._unsent_drops += 1

    # -- streaming ---------------------------------------------------------------
    async def _stream(self) -> None:
        topic = self.ctx.topics.reply(self.ctx.device_id, "logs")
        while True:
            batch = [await self._queue.get()]
            await asyncio.sleep(self.batch_s)
            while not self._queue.empty() and len(batch) < self.max_records:
                batch.append(self._queue.get_nowait())
            if not self.bucket.allow(time.monotonic()):
                self.dropped += len(batch)
                self._unsent_drops += len(batch)
                continue
            body = {"ok": True, "stream": "logs", "records": batch, "dropped": self._unsent_drops}
            env = Envelope(kind="reply", sender=self.ctx.device_id, body=body)
            if self.ctx.publish(topic, encode(env), qos=0):
                self.streamed += len(batch)
                self._unsent_drops = 0
            else:
                self.dropped += len(batch)
                self._unsent_drops += len(batch)
