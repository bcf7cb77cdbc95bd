"""The relay's chunk component as logic: messages in, publishes out (recorded links, no broker).

Learns a transfer from an offer to a board of its site, pulls every chunk once (a bad one from
upstream is not cached), serves boards from the cache or when the chunk arrives, re-pulls a chunk
found rotten on disk, answers an unknown transfer ``xfer.unavailable``, and restarts without
asking again for what it holds."""
from __future__ import annotations

import asyncio
import logging
import os

import protocol.rollout  # noqa: F401 - registers the rollout kinds
import protocol.sites  # noqa: F401 - registers xfer.unavailable
from agent.relay import RelayContext
from agent.relay.cache import ChunkCache
from agent.relay.chunks import UNKNOWN_GRACE_S, ChunkRelay
from protocol import envelope as env_mod
from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.chunks import make_manifest
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message
from protocol.sites import relay_chunk_topic, relay_want_topic
from protocol.topics import Topics

T = Topics()


class Link:
    """Records what the component publishes; always connected."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.connected = asyncio.Event()
        self.connected.set()

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **kw) -> bool:
        self.sent.append((topic, payload))
        return True


def relay_for(tmp) -> tuple[ChunkRelay, RelayContext]:
    ctx = RelayContext(site_name="s1", relay_id="r1", topics=T, site=Link(), upstream=Link(), state_dir=tmp,
                       log=logging.getLogger("test"))
    r = ChunkRelay(ChunkCache(tmp / "cache", 1 << 20), window=8, retry_s=1.0)
    r.ctx, r.mdir = ctx, tmp / "chunks" / "manifests"
    r.mdir.mkdir(parents=True, exist_ok=True)
    r._restore()
    return r, ctx


def run(coro):
    return asyncio.run(coro)


def msg(topic: str, payload: bytes) -> Message:
    return Message(topic, payload, 1)


def upstream_wants(ctx) -> list[int]:
    out = []
    for topic, p in ctx.upstream.sent:
        assert topic == T.data("r1", "xfer")
        out += env_mod.decode(p).body["chunks"]
    ctx.upstream.sent.clear()
    return out


def served(ctx, board: str) -> dict[int, bytes]:
    out = {}
    for topic, p in ctx.site.sent:
        if topic == relay_chunk_topic("edgefleet", "s1", board) and is_frame(p):
            f = decode_frame(p)
            out[f.envelope.body["index"]] = f.blob
    return out


def chunk_frame(tid: str, i: int, blob: bytes) -> bytes:
    return encode_frame(Envelope(kind="xfer.chunk", sender="ctl", body={"transfer_id": tid, "index": i}), blob=blob)


def want(board: str, tid: str, chunks: list[int]) -> Message:
    return msg(relay_want_topic("edgefleet", "s1", board),
               encode(Envelope(kind="xfer.want", sender=board, body={"transfer_id": tid, "chunks": chunks})))


def test_pull_once_serve_many_repull_rotten_restart(tmp_path):
    blob = os.urandom(2500)
    m = make_manifest("t1", blob, 1000)
    parts = [blob[i * 1000:(i + 1) * 1000] for i in range(3)]
    r, ctx = relay_for(tmp_path)
    for b in ("b1", "b2"):
        run(r.on_board_state(msg(T.state(b), encode(Envelope(kind="state", sender=b, body={"status": "online"})))))
    offer = {"rollout_id": "ro-1", "target": {"version": "2.0", "bundle_sha256": "b" * 64}, "base": None,
             "transfer": m.to_dict()}
    run(r.on_offer(msg(T.cmd("zz"), encode(Envelope(kind="model.offer", sender="ctl", body=offer)))))
    assert "t1" not in r.manifests                      # not a board of this site: ignored
    run(r.on_want(want("b1", "t1", [0, 1, 2])))          # asked before the offer came: kept
    run(r.on_offer(msg(T.cmd("b1"), encode(Envelope(kind="model.offer", sender="ctl", body=offer)))))
    r.tick(0)
    assert sorted(upstream_wants(ctx)) == [0, 1, 2]     # prefetch, once
    run(r.on_upstream_chunk(msg(T.bin("r1"), chunk_frame("t1", 1, b"x" * 1000))))   # bad bytes: refused
    assert ctx.counters["chunks.upstream_bad"] == 1 and served(ctx, "b1") == {}
    for i in range(3):
        run(r.on_upstream_chunk(msg(T.bin("r1"), chunk_frame("t1", i, parts[i]))))
    assert served(ctx, "b1") == dict(enumerate(parts))  # the early want, served as the chunks came
    assert "t1" not in r.pulls and ctx.counters["chunks.pulled"] == 3
    run(r.on_want(want("b2", "t1", [0, 1, 2])))
    assert served(ctx, "b2") == dict(enumerate(parts)) and ctx.counters["chunks.pulled"] == 3   # from the cache
    # chunk 2 rots on disk: not served, pulled again, then served
    p = tmp_path / "cache" / m.chunk_sha256[2][:2] / m.chunk_sha256[2]
    p.write_bytes(b"\0" * len(parts[2]))
    ctx.site.sent.clear()
    run(r.on_want(want("b2", "t1", [2])))
    assert served(ctx, "b2") == {}
    r.tick(1)
    assert upstream_wants(ctx) == [2]
    run(r.on_upstream_chunk(msg(T.bin("r1"), chunk_frame("t1", 2, parts[2]))))
    assert served(ctx, "b2") == {2: parts[2]}
    # a restart: the manifest and the cache are on disk, nothing is asked again
    r2, ctx2 = relay_for(tmp_path)
    assert "t1" in r2.manifests and not r2.pulls
    r2.tick(0)
    assert upstream_wants(ctx2) == []


def test_unknown_transfer_is_answered_unavailable_after_the_grace(tmp_path):
    r, ctx = relay_for(tmp_path)
    run(r.on_want(want("b1", "nope", [0])))
    r.unknown[("b1", "nope")] = (0.0, {0})
    r.tick(UNKNOWN_GRACE_S / 2)
    assert not ctx.site.sent
    r.tick(UNKNOWN_GRACE_S + 1)
    (topic, payload), = ctx.site.sent
    env = env_mod.decode(payload)
    assert topic == relay_chunk_topic("edgefleet", "s1", "b1") and env.kind == "xfer.unavailable"
    assert env.body["transfer_id"] == "nope" and env.body["reason"]
    run(r.on_want(msg(relay_want_topic("edgefleet", "s1", "b1"),
                      encode(Envelope(kind="xfer.want", sender="b2", body={"transfer_id": "t", "chunks": [0]})))))
    assert ctx.counters["chunks.refused_sender_mismatch"] == 1   # a board may not ask as another
