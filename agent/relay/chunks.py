"""The relay's chunk component: pull a patch's chunks once over the uplink, serve the site's boards.

* **Learns what to fetch from the offers.** Offers (``model.offer`` on ``dev/{id}/cmd``) cross the
  bridge down to the site; the relay reads those addressed to boards it has seen on the site broker
  and takes the chunk manifest from them. It does not verify the signature — it holds no keys and is
  not trusted: boards check every chunk it serves against the hashes in the offer *they* verified.
  A forged offer only makes the relay ask the centre for a transfer it will not serve.
* **Prefetches** each learnt transfer over its own upstream link (``xfer.want`` on
  ``dev/{relay}/data/xfer``, signed ``xfer.chunk`` frames back on ``dev/{relay}/bin``), with the
  same adaptive window as a board (``agent.updates.transfer.Transfer``). Every chunk is checked
  against the manifest and stored in the content-addressed cache (``cache.py``); what the cache
  holds *is* the transfer's progress, so a restarted relay asks only for what it lacks.
* **Serves** boards' ``xfer.want`` (``site/{site}/relay/want/{dev}``) with unsigned ``xfer.chunk``
  frames on ``site/{site}/relay/chunk/{dev}``, from the cache, or as soon as the chunk arrives
  from upstream. A want for a transfer it never learnt is answered ``xfer.unavailable`` after a
  grace period (the offer may still be on its way), and the board asks the centre.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from protocol import envelope as env_mod
from protocol.atomicfile import write_atomic
from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.chunks import ChunkError, ChunkManifest
from protocol.envelope import DecodeError, Envelope, encode
from protocol.mqttlink import Message
from protocol.rollout import MAX_WANT, XFER_DATA_LEAF, offer_manifest
from protocol.sites import relay_chunk_topic, site_base

from ..updates.transfer import Transfer
from . import RelayContext
from .cache import ChunkCache

#: a want for a transfer not (yet) learnt from an offer waits this long before "unavailable"
UNKNOWN_GRACE_S = 5.0
#: transfers (manifests) remembered; the oldest are forgotten beyond (their chunks stay cached)
MAX_MANIFESTS = 64


def _safe(tid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in tid)[:64]


class ChunkRelay:
    name = "chunks"

    def __init__(self, cache: ChunkCache, window: int = 32, retry_s: float = 3.0,
                 max_frame_bytes: int = 8 * 1024 * 1024) -> None:
        self.cache = cache
        self.window = window
        self.retry_s = retry_s
        self.max_frame_bytes = max_frame_bytes
        self.manifests: dict[str, ChunkManifest] = {}
        self.pulls: dict[str, Transfer] = {}
        self.waiting: dict[str, dict[int, set[str]]] = {}     # tid -> chunk -> boards waiting for it
        #: wants for transfers not learnt yet: (board, tid) -> (first asked, chunks); served once learnt
        self.unknown: dict[tuple[str, str], tuple[float, set[int]]] = {}
        self.boards: set[str] = set()                         # boards seen on the site broker
        self.ctx: RelayContext | None = None
        self.mdir: Path | None = None

    # -- wiring ------------------------------------------------------------------
    async def run(self, ctx: RelayContext) -> None:
        self.ctx = ctx
        self.mdir = ctx.state_dir / "chunks" / "manifests"
        self.mdir.mkdir(parents=True, exist_ok=True)
        self._restore()
        base = ctx.topics.base
        ctx.on_site(f"{base}/dev/+/state", self.on_board_state)
        ctx.on_site(f"{base}/dev/+/cmd", self.on_offer)
        ctx.on_site(f"{site_base(ctx.topics.root, ctx.site_name)}/relay/want/+", self.on_want)
        ctx.on_upstream(ctx.topics.bin(ctx.relay_id), self.on_upstream_chunk)
        while True:
            await asyncio.sleep(min(0.25, self.retry_s / 4))
            self.tick(time.monotonic())

    def _restore(self) -> None:
        """Manifests learnt before a restart; their cached chunks count as held."""
        assert self.mdir is not None
        for f in sorted(self.mdir.glob("*.json"), key=lambda p: p.stat().st_mtime):
            try:
                m = ChunkManifest.from_dict(json.loads(f.read_text()))
            except (OSError, ValueError, ChunkError):
                f.unlink(missing_ok=True)
                continue
            self._learn(m, persist=False)

    def _learn(self, m: ChunkManifest, persist: bool = True) -> None:
        tid = m.transfer_id
        if tid in self.manifests and self.manifests[tid] == m:
            return
        self.manifests[tid] = m
        if persist and self.mdir is not None:
            write_atomic(self.mdir / f"{_safe(tid)}.json", json.dumps(m.to_dict()))
        have = {i for i, h in enumerate(m.chunk_sha256) if h in self.cache}
        if len(have) < m.count:
            self.pulls[tid] = Transfer(m, window=min(8, self.window), retry_s=self.retry_s, have=have,
                                       max_window=self.window)
            self._count("transfers_learnt")
        for (board, t2), (_, chunks) in list(self.unknown.items()):   # asked before the offer reached us
            if t2 == tid:
                del self.unknown[(board, t2)]
                self._want(board, m, sorted(chunks))
        while len(self.manifests) > MAX_MANIFESTS:
            old = next(iter(self.manifests))
            self.manifests.pop(old)
            self.pulls.pop(old, None)
            if self.mdir is not None:
                (self.mdir / f"{_safe(old)}.json").unlink(missing_ok=True)

    def _count(self, key: str, n: int = 1) -> None:
        if self.ctx is not None:
            self.ctx.counters[f"chunks.{key}"] += n

    # -- site side ---------------------------------------------------------------
    async def on_board_state(self, msg: Message) -> None:
        parsed = self.ctx.topics.parse(msg.topic) if self.ctx else None
        if parsed is None or msg.payload[:1] != b"{":
            return
        try:
            env = env_mod.decode(msg.payload, expect_sender=parsed[0])
        except DecodeError:
            return
        if env.body.get("role") == "relay":
            return
        self.boards.add(parsed[0])

    async def on_offer(self, msg: Message) -> None:
        """Offers to this site's boards (they crossed the bridge): learn and prefetch the transfer."""
        parsed = self.ctx.topics.parse(msg.topic) if self.ctx else None
        if parsed is None or parsed[0] not in self.boards or is_frame(msg.payload):
            return
        try:
            env = env_mod.decode(msg.payload)
        except DecodeError:
            return
        if env.kind != "model.offer":
            return
        try:
            m = offer_manifest(env.body)
        except (ChunkError, KeyError, TypeError):
            return
        self._learn(m)

    async def on_want(self, msg: Message) -> None:
        assert self.ctx is not None
        board = msg.topic.rsplit("/", 1)[-1]
        try:
            env = env_mod.decode(msg.payload, expect_sender=board)
        except DecodeError as exc:
            self._count(f"refused_{exc.reason}")
            return
        if env.kind != "xfer.want":
            self._count("refused_kind")
            return
        tid = env.body["transfer_id"]
        m = self.manifests.get(tid)
        if m is None:
            since, chunks = self.unknown.get((board, tid), (time.monotonic(), set()))
            if len(self.unknown) < 10000:
                self.unknown[(board, tid)] = (since, chunks | set(env.body["chunks"]))
            return
        self._want(board, m, env.body["chunks"])

    def _want(self, board: str, m: ChunkManifest, chunks: list[int]) -> None:
        tid = m.transfer_id
        self._count("wants")
        for i in chunks:
            if not (0 <= i < m.count):
                continue
            if not self._serve(board, m, i):
                self.waiting.setdefault(tid, {}).setdefault(i, set()).add(board)
                t = self.pulls.get(tid)
                if t is None:   # evicted or found corrupt since: fetch it again
                    have = {j for j, h in enumerate(m.chunk_sha256) if h in self.cache}
                    self.pulls[tid] = Transfer(m, window=min(8, self.window), retry_s=self.retry_s, have=have,
                                               max_window=self.window)
                elif i in t.have and m.chunk_sha256[i] not in self.cache:
                    t.have.discard(i)   # pulled once, gone since (evicted, or rotten on disk)

    def _serve(self, board: str, m: ChunkManifest, i: int) -> bool:
        assert self.ctx is not None
        data = self.cache.get(m.chunk_sha256[i])
        if data is None:
            return False
        env = Envelope(kind="xfer.chunk", sender=self.ctx.relay_id, body={"transfer_id": m.transfer_id, "index": i})
        topic = relay_chunk_topic(self.ctx.topics.root, self.ctx.site_name, board)
        if self.ctx.site.publish(topic, encode_frame(env, blob=data), 1):
            self._count("served")
            self._count("served_bytes", len(data))
            return True
        return False

    def _unavailable(self, board: str, tid: str, reason: str) -> None:
        assert self.ctx is not None
        env = Envelope(kind="xfer.unavailable", sender=self.ctx.relay_id,
                       body={"transfer_id": tid, "reason": reason})
        self.ctx.site.publish(relay_chunk_topic(self.ctx.topics.root, self.ctx.site_name, board), encode(env), 1)
        self._count("unavailable")

    # -- upstream side -----------------------------------------------------------
    async def on_upstream_chunk(self, msg: Message) -> None:
        try:
            frame = decode_frame(msg.payload, max_bytes=self.max_frame_bytes)
        except DecodeError:
            self._count("upstream_refused")
            return
        body = frame.envelope.body
        if frame.envelope.kind != "xfer.chunk":
            return
        tid, i = body.get("transfer_id"), body.get("index")
        m = self.manifests.get(tid)
        if m is None:
            self._count("upstream_stray")
            return
        t = self.pulls.get(tid)
        try:
            m.check(i, frame.blob)
        except ChunkError:
            self._count("upstream_bad")
            return
        self.cache.put(m.chunk_sha256[i], frame.blob)
        self._count("pulled")
        self._count("pulled_bytes", len(frame.blob))
        if t is not None:
            try:
                t.accept(i, frame.blob, time.monotonic())
            except ChunkError:
                pass
            if t.complete:
                self.pulls.pop(tid, None)
        for board in (self.waiting.get(tid) or {}).pop(i, set()):
            self._serve(board, m, i)
        self._ask(tid)

    def _ask(self, tid: str, force: bool = False) -> None:
        assert self.ctx is not None
        t = self.pulls.get(tid)
        if t is None or not self.ctx.upstream.connected.is_set():
            return
        want = t.wants(time.monotonic(), force=force)
        for j in range(0, len(want), MAX_WANT):
            body = {"transfer_id": tid, "chunks": want[j:j + MAX_WANT], "have": len(t.have), "total": t.count}
            env = Envelope(kind="xfer.want", sender=self.ctx.relay_id, body=body)
            if not self.ctx.upstream.publish(self.ctx.topics.data(self.ctx.relay_id, XFER_DATA_LEAF), encode(env), 1):
                t.inflight.clear()
                return
            self._count("upstream_wants")

    def on_upstream_connect(self) -> None:
        for tid in list(self.pulls):
            self._ask(tid, force=True)

    def tick(self, now: float) -> None:
        for tid in list(self.pulls):
            self._ask(tid)
        for (board, tid), (since, _) in list(self.unknown.items()):
            if now - since >= UNKNOWN_GRACE_S:
                del self.unknown[(board, tid)]
                self._unavailable(board, tid, "the relay has not seen the offer of this transfer")
        if self.ctx is not None:
            self.ctx.status["chunks"] = {"cache": self.cache.stats(), "transfers": len(self.manifests),
                                         "pulling": {tid: f"{len(t.have)}/{t.count}" for tid, t in self.pulls.items()},
                                         "boards": len(self.boards)}

    def figures(self) -> dict[str, Any]:
        return {"cache": self.cache.stats(), "pulling": len(self.pulls), "transfers": len(self.manifests)}
