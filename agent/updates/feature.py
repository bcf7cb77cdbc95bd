"""Model updates on the agent: take an offer, pull its chunks, apply the signed patch.

Wiring only. ``agent.updates.transfer`` decides which chunks to ask for, ``protocol.patch``
verifies, ``agent.updates.modelstore`` stages, health-checks and switches, and
``agent.updates.states`` is the table of the steps an update may take. Chunks land in
``<state>/transfers/<transfer id>/patch.part`` as they arrive, so an agent that loses
the link — or is restarted — asks only for what it does not hold, and one restarted with
every chunk on disk applies it as soon as it runs. A version already kept on the board
is switched to under the same rules as an install: the downgrade rule (``allow_downgrade``
in the signed offer) and the health gate. Every step is a
``model.update`` event (status offered → downloading → received → verified → staged →
healthy → applied, or failed / rolled_back with the reason) that dashboards and the
controller's rollout runner read. Bad chunks and stray frames are counted and dropped.

Behind a site relay (``device.site`` set, docs/sites.md) chunks are asked of the relay while its
retained ``site/{site}/relay/state`` says online: wants go to ``site/{site}/relay/want/{id}``, its
unsigned chunk frames arrive on ``site/{site}/relay/chunk/{id}`` and are held to exactly the same
check as the controller's — the hash in the signed offer — so a relay is never trusted. The board
asks the centre instead (``dev/{id}/data/xfer``, signed chunks on ``bin``) when the relay is
offline (its will), says ``xfer.unavailable``, served 3 bad chunks, or sent nothing for
``model.relay_stall_s``; for the rest of that transfer.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from protocol import rollout as ro
from protocol.binary import Frame
from protocol.chunks import ChunkError, ChunkManifest
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message
from protocol.patch import PatchError, bundle_id
from protocol.sites import relay_chunk_topic, relay_state_topic, relay_want_topic

from ..core.context import AgentContext, Feature, Subscription
from .modelstore import failpoint
from .states import IDLE, KEPT_SWITCH, UpdateState, UpdateStateError
from .transfer import PartFile, Transfer
from protocol.atomicfile import write_atomic

if TYPE_CHECKING:  # pragma: no cover
    from .modelstore import ModelStore

log = logging.getLogger("edge_agent.update")


@dataclass
class Active:
    offer: dict[str, Any]
    transfer: Transfer
    part: PartFile
    started: float
    held_at_start: int = 0
    via_relay: bool = True        # ask the site relay (while it is online) or the centre
    relay_bad: int = 0            # chunks from the relay that failed the signed hash
    relay_progress: float = 0.0   # monotonic time of the last relay chunk (or of switching to it)

    @property
    def tid(self) -> str:
        return self.transfer.manifest.transfer_id


class ServingPort(Protocol):
    """What the updater needs of serving: the store, reloading, and the health gate."""

    store: "ModelStore | None"

    def load_current(self) -> bool: ...

    def health_check(self, staged: Path) -> dict[str, Any]: ...

    def switch_gate(self, target: Path) -> Callable[[Path], dict[str, Any]]: ...


class McuPort(Protocol):
    """The sensor MCU on the board's serial port (agent.mcu), when there is one."""

    @property
    def attached(self) -> str | None: ...

    async def push_file(self, name: str, blob: bytes, bundle: str) -> tuple[bool, str]: ...


def _safe_tid(tid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in tid)[:64]


class Updater(Feature):
    name = "update"

    def __init__(self, ctx: AgentContext, serving: ServingPort, mcu: McuPort | None = None) -> None:
        self.ctx = ctx
        self.serving = serving
        self.mcu = mcu
        mc = ctx.cfg.model
        self.dir = Path(ctx.cfg.state.dir) / "transfers"
        self.max_bytes = mc.max_transfer_bytes
        self.window = mc.transfer_window
        self.retry_s = mc.transfer_retry_s
        self.active: Active | None = None
        self.applying = False
        #: written while a new version's files go to the sensor MCU; found at start-up it means we died
        #: mid-push, so the board goes back to the version whose model the MCU still runs
        self.mcu_pending = Path(ctx.cfg.state.dir) / "mcu-push-pending.json"
        self.stats = {"offers": 0, "chunks": 0, "bad_chunks": 0, "stray_chunks": 0, "applied": 0, "failed": 0,
                      "resumed": 0}
        self.last: dict[str, Any] | None = None
        self.state = UpdateState()
        self._update_target: str | None = None
        self.trusted = self._load_trusted()
        self.site = ctx.cfg.device.site
        self.relay_online = False
        self.relay_stall_s = getattr(mc, "relay_stall_s", 15.0)
        self.stats.update({"relay_chunks": 0, "relay_bad_chunks": 0, "relay_fallbacks": 0})

    # -- declarations ----------------------------------------------------------
    def start(self) -> None:
        self.restore()

    def control_kinds(self) -> dict[str, Any]:
        return {"model.offer": self.on_offer, "xfer.chunk": self.on_chunk}

    def subscriptions(self) -> list[Subscription]:
        if not self.site:
            return []
        root = self.ctx.topics.root
        return [Subscription(relay_state_topic(root, self.site), 1, self.on_relay_state),
                Subscription(relay_chunk_topic(root, self.site, self.ctx.device_id), 1, self.on_relay_message)]

    # -- the site relay ------------------------------------------------------------
    def _use_relay(self, a: Active) -> bool:
        return bool(self.site) and self.relay_online and a.via_relay

    def _fall_back(self, a: Active, why: str) -> None:
        """The rest of this transfer comes from the centre (signed chunks through the bridge)."""
        if not a.via_relay:
            return
        a.via_relay = False
        self.stats["relay_fallbacks"] += 1
        log.warning("transfer %s: asking the centre from now on: %s", a.tid, why)
        self._ask(force=True)

    async def on_relay_state(self, msg: Message) -> None:
        from protocol import envelope as env_mod
        from protocol.envelope import DecodeError

        try:
            env = env_mod.decode(msg.payload) if msg.payload else None
        except DecodeError:
            self.ctx.counters.reject("bad_relay_state")
            return
        was = self.relay_online
        self.relay_online = bool(env is not None and env.body.get("status") == "online")
        a = self.active
        if a is None or self.applying or was == self.relay_online:
            return
        if self.relay_online:
            a.relay_progress = time.monotonic()
        else:
            log.warning("transfer %s: the site relay went offline; asking the centre", a.tid)
        self._ask(force=True)

    async def on_relay_message(self, msg: Message) -> None:
        decoded = self.ctx.decode(msg)
        if decoded is None:
            return
        env, frame = decoded
        a = self.active
        if env.kind == "xfer.unavailable":
            if a is not None and env.body.get("transfer_id") == a.tid:
                self._fall_back(a, f"the relay cannot serve it ({env.body.get('reason')})")
            return
        if env.kind != "xfer.chunk" or frame is None:
            self.ctx.counters.reject("unexpected_kind")
            return
        await self.on_chunk(frame, msg, via_relay=True)

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [("updates", self.run)]

    def _transfer(self, manifest: ChunkManifest, have: set[int]) -> Transfer:
        """Start with a small window that grows to ``model.transfer_window`` while chunks arrive in time."""
        return Transfer(manifest, window=min(8, self.window), retry_s=self.retry_s, have=have,
                        max_window=self.window)

    def _load_trusted(self) -> list[Any]:
        from protocol.signing import SignatureError, load_public

        keys = []
        for path in self.ctx.cfg.security.trusted_keys:
            try:
                keys.append(load_public(path))
            except SignatureError as exc:
                log.error("trusted key %s unusable: %s", path, exc)
        return keys

    # -- reporting --------------------------------------------------------
    def report(self, status: str, offer: dict[str, Any] | None, reason: str = "", *, active: bool = False,
               **data: Any) -> None:
        """One ``model.update`` event; ``active``: a step of the active transfer (checked by the table)."""
        if active:
            before = self.state.state
            try:
                self.state.advance(status)
            except UpdateStateError:  # our bug: say so loudly, still tell the controller what happened
                log.exception("update state table")
                self.ctx.counters.reject("update_state_error")
                self.state.reset()
            if (before == IDLE) != (self.state.state == IDLE):
                self._update_target = ((offer or {}).get("target") or {}).get("version")
                self.ctx.republish_state()   # dashboards: an update started or ended (HA's in_progress)
        target = (offer or {}).get("target") or {}
        body: dict[str, Any] = {"status": status, "reason": reason,
                                "rollout_id": (offer or {}).get("rollout_id"),
                                "transfer_id": ((offer or {}).get("transfer") or {}).get("transfer_id"),
                                "version": target.get("version"), "bundle_sha256": target.get("bundle_sha256"),
                                **data}
        level = "error" if status in ("failed", "rolled_back") else "info"
        self.last = {"status": status, "reason": reason, "version": target.get("version"), "ts": time.time()}
        self.ctx.emit_event("model.update", level, **{k: v for k, v in body.items() if v is not None})

    def state_fields(self) -> dict[str, Any]:
        """While an update is under way: its step and target, in the retained state (HA's update
        entity shows it as in progress)."""
        if self.state.state == IDLE:
            return {}
        return {"update": {"state": self.state.state, "version": self._update_target}}

    def telemetry(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.stats)
        a = self.active
        if a is not None:
            t = a.transfer
            out["transfer"] = {"id": a.tid, "version": a.offer["target"]["version"], "have": len(t.have),
                               "chunks": t.count, "bytes": t.received_bytes, "total_bytes": t.manifest.total_size,
                               "rerequested": t.rerequested, "window": t.window,
                               "source": "relay" if self._use_relay(a) else "centre",
                               "rto_s": round(t.rto, 3)}
        if self.last:
            out["last"] = self.last
        return out

    # -- start-up and reconnects ---------------------------------------------
    def restore(self) -> None:
        """Pick up a transfer that a restart interrupted (its chunks are still on disk). A version
        the board just went back from (killed mid MCU push) is not taken up again on its own: the
        controller re-offers it if it still wants it."""
        gone_back_from = self._restore_mcu_pending()
        if not self.dir.is_dir():
            return
        for d in sorted(self.dir.iterdir()):
            try:
                offer = json.loads((d / "offer.json").read_text())
                manifest = ChunkManifest.from_dict(offer["transfer"])
            except (OSError, ValueError, KeyError, TypeError, ChunkError):
                shutil.rmtree(d, ignore_errors=True)
                continue
            if self.active is not None or offer["target"]["bundle_sha256"] in (self._installed_id(), gone_back_from):
                shutil.rmtree(d, ignore_errors=True)
                continue
            part = PartFile(d, manifest)
            t = self._transfer(manifest, part.held())
            self.active = Active(offer, t, part, time.time(), len(t.have))
            self.state.resume()
            self.stats["resumed"] += 1
            log.info("resuming transfer %s: %d of %d chunks on disk", manifest.transfer_id, len(t.have), t.count)

    def _restore_mcu_pending(self) -> str | None:
        """Killed while pushing a version's files to the MCU: back to the version it still runs.
        Returns the bundle id gone back from (None when there was nothing to undo)."""
        try:
            pending = json.loads(self.mcu_pending.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pending = {}
        store = self.serving.store
        gone: str | None = None
        if store is not None and pending.get("bundle_sha256") and self._installed_id() == pending["bundle_sha256"]:
            back = store.rollback()
            self.serving.load_current()
            gone = pending["bundle_sha256"]
            self.report("rolled_back", pending.get("offer"),
                        f"interrupted while pushing the new model to the MCU; back to {back.version or '?'}")
        self.mcu_pending.unlink(missing_ok=True)
        return gone

    def _clear_mcu_pending(self) -> None:
        self.mcu_pending.unlink(missing_ok=True)

    async def on_connect(self) -> None:
        if self.active is not None and not self.applying:
            self._ask(force=True)

    async def run(self) -> None:
        """Apply a transfer that was already complete on disk at start-up (killed after its last chunk:
        no chunk and no offer will come to trigger it); then re-ask for chunks whose request timed
        out (lost message, dropped link)."""
        a = self.active
        if a is not None and a.transfer.complete and not self.applying:
            log.info("transfer %s was complete on disk at start-up: applying it", a.tid)
            await self._apply()
        while True:
            await asyncio.sleep(min(0.5, self.retry_s / 2))
            a = self.active
            if a is not None and not self.applying:
                if self._use_relay(a) and a.transfer.inflight \
                        and time.monotonic() - a.relay_progress > self.relay_stall_s:
                    self._fall_back(a, f"no chunk from the relay for {self.relay_stall_s:g} s")
                self._ask()

    # -- messages ------------------------------------------------------------
    def _installed_id(self) -> str | None:
        store = self.serving.store
        cur = store.current if store else None
        try:
            return bundle_id(cur) if cur is not None else None
        except PatchError:
            return None

    async def on_offer(self, env: Envelope, msg: Message) -> None:
        offer = dict(env.body)
        self.stats["offers"] += 1
        manifest = ro.offer_manifest(offer)
        target = offer["target"]
        store = self.serving.store
        if store is None:
            self.report("failed", offer, "no model store on this device")
            return
        if self.applying:
            log.info("offer %s ignored: an update is being applied", manifest.transfer_id)
            return
        have = self._installed_id()
        if have == target["bundle_sha256"]:
            self.report("unchanged", offer, "already installed")
            self.ctx.republish_state()
            return
        kept = store.find_id(target["bundle_sha256"])
        if kept is not None:  # a version we still hold: switch to it, nothing to download
            await self._switch_kept(store, kept, offer)
            return
        base = offer.get("base")
        if base is not None and have != base["bundle_sha256"]:
            self.report("failed", offer, f"wrong base: patch is for {base['version']} ({base['bundle_sha256'][:12]}), "
                                         f"installed is {(have or 'nothing')[:12]}")
            self.stats["failed"] += 1
            return
        if not self.trusted:
            self.report("failed", offer, "no trusted keys configured: patches cannot be verified")
            self.stats["failed"] += 1
            return
        if manifest.total_size > self.max_bytes:
            self.report("failed", offer, f"patch of {manifest.total_size} bytes exceeds model.max_transfer_bytes "
                                         f"({self.max_bytes})")
            self.stats["failed"] += 1
            return
        a = self.active
        if a is not None and a.tid == manifest.transfer_id:
            # same bytes; a newer offer may carry another rollout id. Not a forced re-ask: the chunks
            # asked for may still be on their way (a new rollout owner offers again after a takeover,
            # and the dead one's last chunks can sit in the broker), so they are asked again only when
            # their request times out, as a lost chunk is — never served twice
            a.offer = offer
            self._ask()
            return
        if a is not None:
            log.info("transfer %s replaced by %s", a.tid, manifest.transfer_id)
            shutil.rmtree(a.part.dir, ignore_errors=True)
            self.active = None
            self.state.reset()
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        if free < 2 * manifest.total_size + (16 << 20):
            self.report("failed", offer, f"not enough disk: {free} bytes free for a {manifest.total_size}-byte patch")
            self.stats["failed"] += 1
            return
        d = self.dir / _safe_tid(manifest.transfer_id)
        d.mkdir(parents=True, exist_ok=True)
        write_atomic(d / "offer.json", json.dumps(offer))
        part = PartFile(d, manifest)
        t = self._transfer(manifest, part.held())
        self.active = Active(offer, t, part, time.time(), len(t.have))
        self.report("downloading", offer, active=True, bytes=manifest.total_size, chunks=manifest.count,
                    held=len(t.have))
        if t.complete:
            await self._apply()
        else:
            self._ask(force=True)

    async def _switch_kept(self, store: "ModelStore", kept: Path, offer: dict[str, Any]) -> None:
        """A kept version obeys the install's rules: the downgrade rule (``allow_downgrade`` is in the
        signed offer) and the health gate on it, before it serves."""
        self.applying = True
        try:
            res = await asyncio.to_thread(store.switch, kept, self.serving.switch_gate(kept),
                                          bool(offer.get("allow_downgrade")))
            if not res.ok:
                self.stats["failed"] += 1
                status = "rolled_back" if "unhealthy" in res.steps else "failed"
                assert status in KEPT_SWITCH
                self.report(status, offer, res.reason)
                return
            refused = await self._finish_switch(store, offer)
            if refused:
                self.report("rolled_back", offer, refused)
                return
            self.report("applied", offer, "switched to a version kept on this device", health=res.health)
        finally:
            self.applying = False

    async def on_chunk(self, frame: Frame, msg: Message, via_relay: bool = False) -> None:
        if not isinstance(frame, Frame):
            self.ctx.counters.reject("chunk_not_a_frame")
            return
        body = frame.envelope.body
        a = self.active
        if a is None or body.get("transfer_id") != a.tid or self.applying:
            self.stats["stray_chunks"] += 1
            self.ctx.counters.reject("stray_chunk")
            return
        try:
            new = a.transfer.accept(body["index"], frame.blob, time.monotonic())
        except ChunkError as exc:
            self.stats["bad_chunks"] += 1
            self.ctx.counters.reject("bad_chunk")
            log.warning("transfer %s: refused %s%s", a.tid, exc, " (from the site relay)" if via_relay else "")
            if via_relay:
                self.stats["relay_bad_chunks"] += 1
                a.relay_bad += 1
                # ask again at once (the relay re-checks its copy; the centre after 3)
                a.transfer.inflight.pop(body.get("index"), None)   # type: ignore[arg-type]
                if a.relay_bad >= 3:
                    self._fall_back(a, f"{a.relay_bad} chunks from the relay failed the signed hash")
                else:
                    self._ask()
            return
        if via_relay:
            self.stats["relay_chunks"] += 1
            a.relay_progress = time.monotonic()
        if new:
            try:
                a.part.write(body["index"], frame.blob)
            except OSError as exc:  # disk full, read-only fs: give up cleanly, the old model keeps serving
                self._finish_failed(a, "failed", f"cannot write the transfer to disk: {exc.strerror or exc}")
                return
            self.stats["chunks"] += 1
            if len(a.transfer.have) == a.transfer.count // 2:
                failpoint("transfer_half")
            if a.transfer.complete:
                failpoint("transfer_complete")
        if a.transfer.complete:
            await self._apply()
        else:
            self._ask()

    def _ask(self, force: bool = False) -> None:
        a = self.active
        if a is None:
            return
        want = a.transfer.wants(time.monotonic(), force=force)
        if not want:
            return
        relay = self._use_relay(a)
        topic = (relay_want_topic(self.ctx.topics.root, self.site, self.ctx.device_id) if relay
                 else self.ctx.topics.data(self.ctx.device_id, ro.XFER_DATA_LEAF))
        if relay and not a.relay_progress:
            a.relay_progress = time.monotonic()
        for i in range(0, len(want), ro.MAX_WANT):
            body = {"transfer_id": a.tid, "chunks": want[i:i + ro.MAX_WANT], "have": len(a.transfer.have),
                    "total": a.transfer.count}
            env = Envelope(kind="xfer.want", sender=self.ctx.device_id, body=body)
            if not self.ctx.publish(topic, encode(env), qos=1):
                # not connected: forget the in-flight marks, ask again on reconnect
                a.transfer.inflight.clear()
                return

    async def _apply(self) -> None:
        a = self.active
        assert a is not None
        self.applying = True
        try:
            offer = a.offer
            try:
                data = a.part.read_all()
            except (ChunkError, OSError) as exc:
                self._finish_failed(a, "failed", f"transfer corrupt: {exc}")
                return
            self.report("received", offer, active=True, bytes=len(data))
            store = self.serving.store
            try:
                res = await asyncio.to_thread(store.apply_patch, data, self.trusted, self.serving.health_check,
                                              bool(offer.get("allow_downgrade")))
            except Exception as exc:  # noqa: BLE001 - our bug or the OS: report it, keep serving the old model
                log.exception("applying %s failed", a.tid)
                self._finish_failed(a, "failed", f"internal error while applying: {exc}")
                return
            for step in res.steps[1:]:
                if step in ro.UPDATE_STATUSES and step != "applied":
                    self.report(step, offer, active=True, **(res.health if step == "healthy" else {}))
            if res.ok:
                refused = await self._finish_switch(store, offer)
                if refused:
                    self._finish_failed(a, "rolled_back", refused)
                    return
                self.stats["applied"] += 1
                self.report("applied", offer, "installed", active=True, seconds=round(time.time() - a.started, 3),
                            chunks=a.transfer.count, held_at_start=a.held_at_start,
                            rerequested=a.transfer.rerequested, bytes=a.transfer.manifest.total_size)
                shutil.rmtree(a.part.dir, ignore_errors=True)
                self.active = None
            else:
                status = "rolled_back" if "unhealthy" in res.steps else "failed"
                if res.reason.startswith("refused: already installed"):
                    status = "unchanged"
                self._finish_failed(a, status, res.reason)
        finally:
            self.applying = False

    async def _finish_switch(self, store: Any, offer: dict[str, Any]) -> str:
        """After the store switched: the sensor MCU gets its part, then the new version serves.
        When the MCU refuses it, the whole version goes and the old one serves; returns why ("" = ok)."""
        refused = await self._push_mcu_files(store, offer)
        if refused:
            back = store.rollback()
            refused = f"{refused}; back to {back.version if back.ok else 'the previous version'}"
        self._clear_mcu_pending()
        self.serving.load_current()
        self.ctx.republish_state()
        return refused

    async def _push_mcu_files(self, store: Any, offer: dict[str, Any]) -> str:
        """Files of role ``mcu`` that this version changed go to the sensor MCU over the firmware
        bridge; the MCU's final ACK/NACK decides the update. Returns the reason it failed, or ""."""
        from protocol.patch import read_manifest

        cur, prev = store.current, store.previous
        try:
            manifest = read_manifest(cur)
            files = manifest["files"]
            old = read_manifest(prev)["files"] if prev is not None else {}
        except PatchError:
            return ""
        changed = [n for n, e in files.items() if (e or {}).get("role") == "mcu"
                   and (e or {}).get("sha256") != (old.get(n) or {}).get("sha256")]
        if not changed:
            return ""
        mcu = self.mcu
        if mcu is None or mcu.attached is None:
            self.ctx.emit_event("mcu.model.skipped", "warning", files=changed,
                                  reason="no MCU attached to this board; the files stay in the bundle (mcu.push)")
            return ""
        label = f"{manifest.get('name')} {manifest['version']}"
        write_atomic(self.mcu_pending, json.dumps({"bundle_sha256": bundle_id(cur), "offer": offer}))
        failpoint("mcu_push")
        for name in changed:
            ok, why = await mcu.push_file(name, (cur / name).read_bytes(), label)
            if not ok:
                return f"the MCU refused {name}: {why}"
        return ""

    def _finish_failed(self, a: Active, status: str, reason: str) -> None:
        log.error("update to %s %s: %s", a.offer["target"]["version"], status, reason)
        if status != "unchanged":
            self.stats["failed"] += 1
        self.report(status, a.offer, reason, active=True)
        shutil.rmtree(a.part.dir, ignore_errors=True)
        self.active = None
