"""The relay's federated component: one update per site per round over the uplink.

Boards publish their ``fl.update`` on the site broker as always (``dev/{id}/data/fl``); the
bridge does not carry that topic (``protocol.sites``: ``local``), this component does:

* it reads each round's ``fl.task`` as it comes down the bridge (``dev/+/bin``) to learn the round
  (run, round, base version, deadline, tensor shapes, and ``site_agg``: whether and how the
  strategy may be pre-aggregated);
* a round with ``site_agg``: it holds its boards' updates (each written to disk by atomic rename
  before it counts: a relay killed and restarted still has them, and the boards send again until
  the controller acks them anyway), decompresses them, and at the site deadline
  (``protocol.sitefl.site_deadline``) or once every local tasked board answered, sends ONE
  ``fl.site_update`` upstream (float64 sum, float32 mean, total weight, contributors) over its own
  upstream link, again until the controller's ``fl.ack``. The controller acks each counted board
  itself (down the bridge): the relay holds no keys and speaks for no board.
* the controller refuses it naming boards (``exclude``: already counted — direct, or via another
  site, a board that moved — or not registered at this site): it sends again without them and
  forwards their own updates (the controller decides each); any other refusal, or a round without ``site_agg``
  (robust strategies, secure aggregation), or an update late for the site: each board's message
  goes up as it came, so each board gets the controller's own verdict.

DP: boards clip their own updates (the task says so); the relay never clips nor adds noise; the
centre adds noise once. Compression: the relay decompresses and sends the mean raw (float32): one
uncompressed message per site instead of N compressed ones (a gain once N exceeds the
compression ratio), and exact — re-encoding the mean lossily would break the 1e-6 equality.
"""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol import envelope as env_mod
from protocol.atomicfile import write_atomic
from protocol import fl as fl_msgs  # noqa: F401 - registers fl.* kinds
from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.envelope import DecodeError, Envelope
from protocol.mqttlink import Message
from protocol.sitefl import BoardUpdate, SiteRound

from . import RelayContext

if TYPE_CHECKING:  # pragma: no cover
    from ..core.config import AgentConfig

#: the site update (or its resend) not acknowledged by the controller after this long: sent again
RESEND_S = 10.0
#: a round's files are removed this long after its deadline
KEEP_S = 300.0


class FederatedRelay:
    name = "fl"

    def __init__(self, max_frame_bytes: int = 16 << 20, resend_s: float = RESEND_S, keep_s: float = KEEP_S) -> None:
        self.max_frame_bytes = max_frame_bytes
        self.resend_s, self.keep_s = resend_s, keep_s
        self.rounds: dict[str, SiteRound] = {}
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.payloads: dict[str, dict[str, bytes]] = {}      # round key -> board -> its update as it came
        self.forwarded: dict[str, set[str]] = {}             # round key -> boards already forwarded
        self.last_sent: dict[str, float] = {}
        self.local: set[str] = set()                         # boards online on this site's broker
        self.ctx: RelayContext | None = None
        self.dir: Path | None = None

    # -- wiring ------------------------------------------------------------------
    async def run(self, ctx: RelayContext) -> None:
        self.ctx = ctx
        self.dir = ctx.state_dir / "fl"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._restore()
        base = ctx.topics.base
        ctx.on_site(f"{base}/dev/+/state", self.on_board_state)
        ctx.on_site(f"{base}/dev/+/bin", self.on_task)
        ctx.on_site(f"{base}/dev/+/data/fl", self.on_board_update)
        ctx.on_upstream(ctx.topics.cmd(ctx.relay_id), self.on_ack)
        while True:
            await asyncio.sleep(0.25)
            try:
                self.tick(time.time())
            except Exception:  # noqa: BLE001 - one bad round must not stop the component
                ctx.log.exception("relay fl tick failed")

    def _count(self, what: str, n: int = 1) -> None:
        assert self.ctx is not None
        self.ctx.counters[f"fl_{what}"] += n

    def _status(self) -> None:
        assert self.ctx is not None
        self.ctx.status["fl"] = {"rounds": {k: {"state": r.state, "held": len(r.updates), "tasked": len(r.tasked)}
                                            for k, r in self.rounds.items()}}

    # -- persistence -------------------------------------------------------------
    def _rdir(self, key: str) -> Path:
        assert self.dir is not None
        return self.dir / key.replace("/", "_")

    def _save(self, r: SiteRound) -> None:
        doc = {"run_id": r.run_id, "round_no": r.round_no, "base_version": r.base_version, "deadline": r.deadline,
               "seen_at": r.seen_at, "weighting": r.weighting, "tasked": sorted(r.tasked),
               "excluded": sorted(r.excluded), "state": r.state, "sent_contributors": list(r.sent_contributors),
               "shapes": {k: list(v) for k, v in self.shapes.get(r.key, {}).items()}}
        write_atomic(self._rdir(r.key) / "round.json", json.dumps(doc).encode())

    def _restore(self) -> None:
        """Rounds and held updates from disk (a relay restart loses nothing it held)."""
        assert self.dir is not None and self.ctx is not None
        for rd in sorted(p for p in self.dir.iterdir() if p.is_dir()):
            try:
                doc = json.loads((rd / "round.json").read_text())
                r = SiteRound(str(doc["run_id"]), int(doc["round_no"]), int(doc["base_version"]),
                              float(doc["deadline"]), float(doc["seen_at"]), doc.get("weighting"),
                              set(doc.get("tasked") or ()), excluded=set(doc.get("excluded") or ()),
                              state=str(doc.get("state", "collecting")),
                              sent_contributors=tuple(doc.get("sent_contributors") or ()))
                shapes = {k: tuple(int(x) for x in v) for k, v in (doc.get("shapes") or {}).items()}
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self.ctx.log.warning("relay fl: dropping unreadable round state %s: %s", rd.name, exc)
                continue
            self.rounds[r.key], self.shapes[r.key] = r, shapes
            self.payloads[r.key], self.forwarded[r.key] = {}, set()
            for f in sorted((rd / "updates").glob("*.frame")) if (rd / "updates").is_dir() else ():
                payload = f.read_bytes()
                held = self._decode_update(r, f.stem, payload)
                if isinstance(held, BoardUpdate):
                    r.updates[f.stem], self.payloads[r.key][f.stem] = held, payload
                else:
                    self.ctx.log.warning("relay fl: held update %s of %s unreadable: %s", f.stem, r.key, held)
            if r.state == "sent":
                self.last_sent[r.key] = 0.0   # send again at once: its ack may never have come
            self.ctx.log.info("relay fl: restored round %s (%s, %d updates held)", r.key, r.state, len(r.updates))

    # -- what the site broker brings ---------------------------------------------
    async def on_board_state(self, msg: Message) -> None:
        assert self.ctx is not None
        parsed = self.ctx.topics.parse(msg.topic)
        if parsed is None or msg.payload[:1] != b"{":
            return
        try:
            env = env_mod.decode(msg.payload, expect_sender=parsed[0])
        except DecodeError:
            return
        if env.body.get("role") == "relay":
            return
        if env.body.get("status") == "offline":
            self.local.discard(parsed[0])
        else:
            self.local.add(parsed[0])

    async def on_task(self, msg: Message) -> None:
        """A board's ``fl.task`` as it came down the bridge: the round's parameters."""
        assert self.ctx is not None
        parsed = self.ctx.topics.parse(msg.topic)
        if parsed is None or not is_frame(msg.payload):
            return
        try:
            frame = decode_frame(msg.payload, max_bytes=self.max_frame_bytes)
        except DecodeError:
            return   # the board refuses it itself, with its reason
        if frame.envelope.kind != "fl.task":
            return
        b = frame.envelope.body
        key = f"{b['run_id']}#{b['round']}"
        r = self.rounds.get(key)
        if r is None:
            weighting = None if b.get("secagg") else b.get("site_agg")
            r = SiteRound(b["run_id"], int(b["round"]), int(b["base_version"]), float(b["deadline_ts"]),
                          time.time(), weighting)
            self.rounds[key] = r
            self.shapes[key] = {k: tuple(v.shape) for k, v in frame.tensors.items()}
            self.payloads[key], self.forwarded[key] = {}, set()
            self._count("rounds")
            self.ctx.log.info("relay fl: round %s, %s", key,
                              f"aggregating by {weighting}" if weighting else "forwarding every update")
        if r.tasked_board(parsed[0], time.time()):
            self._save(r)
        self._status()

    def _decode_update(self, r: SiteRound, board: str, payload: bytes) -> BoardUpdate | str:
        """The board's delta as float tensors, or why it cannot be held (it is forwarded then)."""
        try:
            frame = decode_frame(payload, max_bytes=self.max_frame_bytes, expect_sender=board)
        except DecodeError as exc:
            return str(exc)
        b = frame.envelope.body
        if frame.envelope.kind != "fl.update":
            return f"kind {frame.envelope.kind}"
        n = b.get("num_samples")
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return "no samples"
        shapes = self.shapes.get(r.key, {})
        try:
            if b["encoding"] == "raw":
                delta = {k: np.asarray(v, np.float32) for k, v in frame.tensors.items()}
            else:
                from protocol.compression import decode_update

                delta = decode_update(frame.blob, shapes)
        except (ValueError, KeyError) as exc:
            return f"cannot decode: {exc}"
        if {k: tuple(v.shape) for k, v in delta.items()} != shapes:
            return "tensors do not match the task's"
        if not all(np.all(np.isfinite(v)) for v in delta.values()):
            return "NaN or inf values"
        loss = b.get("train_loss")
        return BoardUpdate(board, n, delta, float(loss) if isinstance(loss, (int, float)) else None)

    async def on_board_update(self, msg: Message) -> None:
        assert self.ctx is not None
        parsed = self.ctx.topics.parse(msg.topic)
        if parsed is None:
            return
        board = parsed[0]
        try:
            env = decode_frame(msg.payload, max_bytes=self.max_frame_bytes, expect_sender=board).envelope
        except DecodeError:
            self._forward(None, board, msg.payload)   # the controller refuses it, with the reason
            return
        b = env.body
        r = self.rounds.get(f"{b.get('run_id')}#{b.get('round')}") if env.kind == "fl.update" else None
        if r is None:
            self._forward(None, board, msg.payload)   # secure aggregation, async, or a round we never saw
            return
        action = r.accepts(board, b)
        if action == "duplicate":
            self._count("board_resends")
            return
        held = self._decode_update(r, board, msg.payload) if action == "hold" else None
        if not isinstance(held, BoardUpdate):
            if action == "hold":
                self.ctx.log.warning("relay fl: update of %s for %s not aggregated (%s): forwarded", board, r.key, held)
            self._forward(r.key, board, msg.payload)
            return
        write_atomic(self._rdir(r.key) / "updates" / f"{board}.frame", msg.payload)   # on disk before it counts
        r.updates[board] = held
        self.payloads[r.key][board] = msg.payload
        self._count("updates_held")
        self._status()
        self.tick(time.time())

    # -- what goes up --------------------------------------------------------------
    def _forward(self, key: str | None, board: str, payload: bytes) -> None:
        """A board's message up as it came, on its own topic (the controller answers the board)."""
        assert self.ctx is not None
        if self.ctx.upstream.publish(self.ctx.topics.data(board, "fl"), payload, 1):
            self._count("forwarded")
            if key is not None:
                self.forwarded.setdefault(key, set()).add(board)
        else:
            self._count("forward_deferred")   # uplink down: the board sends again until acked

    def _send(self, r: SiteRound, now: float) -> None:
        assert self.ctx is not None
        if r.state == "collecting":
            agg = r.build()
            body = {"run_id": r.run_id, "round": r.round_no, "base_version": r.base_version,
                    "num_samples": agg.num_samples, "site": self.ctx.site_name, "weighting": r.weighting,
                    "contributors": agg.contributors, "encoding": "raw"}
            if agg.train_loss is not None:
                body["train_loss"] = round(agg.train_loss, 6)
            payload = encode_frame(Envelope(kind="fl.site_update", sender=self.ctx.relay_id, body=body), agg.mean)
            write_atomic(self._rdir(r.key) / "site.frame", payload)
            self._save(r)
            self.ctx.log.info("relay fl: round %s: one update for %d boards (%d samples), %d bytes", r.key,
                              len(agg.contributors), agg.num_samples, len(payload))
        else:
            payload = (self._rdir(r.key) / "site.frame").read_bytes()
        if self.ctx.upstream.publish(self.ctx.topics.data(self.ctx.relay_id, "fl"), payload, 1):
            self.last_sent[r.key] = now
            self._count("site_updates_sent")
        else:   # the uplink is down: try again at every tick until it is back
            self.last_sent[r.key] = -float("inf")
            self._count("site_update_deferred")
        self._status()

    def tick(self, now: float) -> None:
        for key, r in list(self.rounds.items()):
            if r.due(now, self.local):
                self._send(r, now)
            elif r.state == "sent" and now - self.last_sent.get(key, 0.0) >= self.resend_s:
                self._send(r, now)   # the controller never answered (uplink down, controller restart)
            elif r.state == "forward":
                for board, payload in self.payloads.get(key, {}).items():
                    if board not in self.forwarded.get(key, set()):
                        self._forward(key, board, payload)
            if now > r.deadline + self.keep_s:
                self._drop(key)

    def _drop(self, key: str) -> None:
        import shutil

        for d in (self.rounds, self.shapes, self.payloads, self.forwarded, self.last_sent):
            d.pop(key, None)
        shutil.rmtree(self._rdir(key), ignore_errors=True)

    async def on_ack(self, msg: Message) -> None:
        """The controller's ``fl.ack`` for our site update."""
        assert self.ctx is not None
        try:
            env = env_mod.decode(msg.payload)
        except DecodeError:
            return
        if env.kind != "fl.ack":
            return
        b = env.body
        r = self.rounds.get(f"{b['run_id']}#{b['round']}")
        if r is None or r.state != "sent":
            return
        what = r.on_ack(b)
        self._save(r)
        self._count(f"site_{what}")
        if what != "done" or not b.get("accepted"):
            self.ctx.log.warning("relay fl: site update for %s refused (%s): %s", r.key, b.get("reason"),
                                 {"rebuild": "sending again without " + ", ".join(b.get("exclude") or ()),
                                  "forward": "forwarding each board's update", "done": "nothing left to send"}[what])
        for board in r.excluded:   # not counted through us: each goes up as it came, the controller decides it
            if board in self.payloads.get(r.key, {}) and board not in self.forwarded.get(r.key, set()):
                self._forward(r.key, board, self.payloads[r.key][board])
        if what == "rebuild":
            self._send(r, time.time())
        self.tick(time.time())


def make_component(cfg: "AgentConfig") -> FederatedRelay:
    return FederatedRelay(max_frame_bytes=int(getattr(cfg.mqtt, "max_frame_bytes", 16 << 20)))
