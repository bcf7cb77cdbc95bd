"""The rollout runner inside ``fleetctl serve``: desired versions, offers, chunks, waves.

It owns the I/O; ``rollouts.py`` decides. Every half second it

* advances each running rollout (release the next wave, abort, finish) by ``decide``;
* reconciles: every online device whose reported bundle differs from its desired one
  gets an offer (a signed ``model.offer`` naming the patch's chunk manifest) — or, when
  the device still keeps that version, a signed ``model.rollback`` — on (re)connect and
  again when nothing has moved for ``reoffer_s``. The desired version lives here, not in
  a retained command, so a device that was away gets exactly what is wanted *now*;
* serves ``xfer.want`` requests with signed ``xfer.chunk`` frames, only for the artifact
  that device was offered — or, for a site relay (its state says ``role = "relay"``), for an
  artifact some board of its site is to get (docs/sites.md: the relay pulls it once for the site).

Artifacts are chosen per device, never a quarantined one (``pick_artifact``): the rollout's
own patch when it fits the device's bundle, else a patch made from two stored bundles (signed
with the controller's key; made once, then reused), else a full bundle. Patches uploaded for
*other* rollouts are used only by rollouts without an artifact of their own (rollbacks, send-backs).
A board that refuses an artifact for an integrity or signature reason gets it quarantined.
"""
from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from protocol import envelope as env_mod
from protocol import rollout as ro
from protocol.chunks import ChunkManifest, make_manifest
from protocol.envelope import DecodeError, Envelope
from protocol.mqttlink import Message
from protocol.patch import version_key

from ..failpoints import failpoint
from .store import Artifact, Desired, RolloutRow, RolloutStore
from .policy import FAILED, FINAL, RolloutPolicy, Slot, decide, fleet_metrics, is_integrity_refusal

if TYPE_CHECKING:  # pragma: no cover
    from ..channel import ControlChannel
    from ..config import ControllerConfig
    from ..lease import Leases
    from ..registry import Device, Registry

log = logging.getLogger("fleetctl.rollouts")

MIN_CHUNK = 64 * 1024
MAX_CHUNKS_PER_TRANSFER = 2048
LEASE = "rollouts"
IN_PROGRESS = ("released", "offered", "downloading", "received", "verified", "staged", "healthy")

#: every step boundary of a rollout where a test may kill the controller (EDGEFLEET_FAILPOINT=name):
#: each must be idempotent across a restart or a replica's takeover (tests/integration/test_takeover_pg.py)
FAILPOINTS = (
    "ro.wave.released",     # a wave's slots and desired versions written; not committed
    "ro.offer.sent",        # a model.offer handed to paho; the slot does not say "offered" yet
    "ro.chunk.sent",        # half of a transfer's chunks handed to paho by this process
    "ro.slot.applied",      # a device reported the new version; its slot says "applied", not committed
    "ro.done",              # the rollout says "done"; not committed
)


def chunk_size_for(total: int) -> int:
    """64 KiB, or larger so that no manifest lists more than 2048 chunk hashes."""
    size = max(MIN_CHUNK, -(-total // MAX_CHUNKS_PER_TRANSFER))
    return -(-size // 4096) * 4096


def device_model(dev: "Device | None") -> dict[str, Any]:
    m = ((dev.state or {}).get("model") if dev else None) or {}
    return m if isinstance(m, dict) else {}


def live_confidence(dev: "Device | None", version: str | None = None, min_inferences: int = 20) -> float | None:
    t = ((dev.telemetry or {}).get("model") if dev else None) or {}
    if not isinstance(t, dict) or (version is not None and t.get("version") != version):
        return None
    if (t.get("inferences") or 0) < min_inferences:
        return None
    c = t.get("mean_confidence")
    return float(c) if isinstance(c, (int, float)) else None


class RolloutRunner:
    def __init__(self, channel: "ControlChannel", registry: "Registry", store: RolloutStore, cfg: "ControllerConfig",
                 reject: Callable[[str, str, str], None], reoffer_s: float = 30.0,
                 clock: Callable[[], float] = time.time, leases: "Leases | None" = None) -> None:
        self.channel, self.registry, self.store, self.reject, self.clock = channel, registry, store, reject, clock
        self.max_message_bytes = cfg.mqtt.max_message_bytes
        self.reoffer_s = reoffer_s
        self.last_offer: dict[str, float] = {}
        self.desired_announced: set[str] = set()   # devices whose retained desired version is out
        self.last_want: dict[str, float] = {}
        self._blobs: OrderedDict[str, tuple[bytes, ChunkManifest]] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.rate = cfg.controller.rollout_max_bytes_per_s
        self._queue: deque[tuple[str, Artifact, int]] = deque()   # (device, artifact, chunk) waiting for the cap
        self._queued: set[tuple[str, Artifact, int]] = set()
        self._sent_of: dict[str, int] = {}   # transfer -> chunks this process sent (the mid-transfer failpoint)
        #: the rollouts have one owner among the replicas (controller/lease.py); None: we are the only one
        self.leases = leases
        self._epoch: int | None = None
        self._relay_ok: dict[tuple[str, str], tuple[bool, float]] = {}

    def owns(self, now: float | None = None, renew: bool = True) -> bool:
        """Whether this replica runs the rollouts now. A lease taken anew forgets the offer and want
        timers and the chunk queue (reconcile re-offers from the store; devices re-ask for chunks).
        ``renew=False`` (message handlers): only what the last tick took, no database write."""
        if self.leases is None:
            return True
        now = self.clock() if now is None else now
        if not renew:
            return self.leases.cached(LEASE, now) is not None and self._epoch is not None
        epoch = self.leases.hold(LEASE, now)
        if epoch != self._epoch:
            self.last_offer.clear()
            self.last_want.clear()
            self._queue.clear()
            self._queued.clear()
            self._epoch = epoch
        return epoch is not None

    # -- loop ----------------------------------------------------------------
    async def run(self) -> None:
        pacer = asyncio.create_task(self._pace(), name="rollout-pacer") if self.rate else None
        try:
            while True:
                await asyncio.sleep(0.5)
                try:
                    self.tick(self.clock())
                except Exception:  # noqa: BLE001 - our bug; log it and keep the service up
                    log.exception("rollout tick failed")
        finally:
            if pacer is not None:
                pacer.cancel()

    async def _pace(self) -> None:
        """Send queued chunks at ``controller.rollout_max_bytes_per_s`` (token bucket, 1 s burst)."""
        tokens, last = 0.0, time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            tokens = min(float(self.rate), tokens + self.rate * (now - last))
            last = now
            while self._queue and tokens > 0:
                item = self._queue.popleft()
                self._queued.discard(item)
                tokens -= self._send_chunk(*item)

    def tick(self, now: float) -> None:
        self.counts["running"] = len(self.store.rollouts(status="running"))
        if not self.owns(now):
            return
        for r in self.store.rollouts(status="aborting"):   # an operator's abort, persisted by the CLI
            self.abort(r, r.reason or "aborted by the operator", r.figures, now, keep_updated=r.keep_updated)
        for r in self.store.rollouts(status="running"):
            self.advance(r, now)
        self.reconcile(time.monotonic())
        self.registry.commit()

    # -- rollouts --------------------------------------------------------------
    def advance(self, r: RolloutRow, now: float) -> None:
        policy = RolloutPolicy.from_dict(r.policy)
        if r.wave < 0:
            self.release(r, 0, now)
            return
        devices = {d.id: d for d in self.registry.devices()}
        slots, models = [], []
        for s in self.store.slots(r.id):
            dev = devices.get(s.device_id)
            after = s.conf_after
            if s.status == "applied":
                # the device's running mean over the new version, refreshed every tick of the wave and
                # its soak: the fleet gate judges what the devices saw since they switched
                live = live_confidence(dev, r.version)
                if live is not None and live != after:
                    after = live
                    self.store.update_slot(r.id, s.device_id, conf_after=after)
                m = ((dev.telemetry or {}).get("model") if dev else None) or {}
                if isinstance(m, dict) and m.get("version") == r.version:
                    models.append(m)
            slots.append(Slot(s.device_id, s.wave, s.status, bool(dev and dev.online), s.conf_before, after,
                              s.acc_before, s.acc_after))
        d = decide(now, policy, r.wave, r.wave_started or now, r.waves, slots, r.soak_started)
        figures = {**d.figures, "fleet": fleet_metrics(models)}
        for dev_id in d.timed_out:
            self.store.update_slot(r.id, dev_id, status="timeout", reason="did not finish within the wave timeout")
            self._send_back(r, dev_id)
        if d.action == "release":
            self.release(r, d.wave, now)
        elif d.action == "soak":
            log.info("rollout %s: %s", r.id, d.reason)
            self.store.update_rollout(r.id, expect=("running",), soak_started=now, figures=figures)
        elif d.action == "abort":
            self.abort(r, d.reason, figures, now)
        elif d.action == "done":
            log.info("rollout %s done: %s", r.id, figures)
            self.store.update_rollout(r.id, expect=("running",), status="done", reason=d.reason, figures=figures,
                                      finished=now)
            failpoint("ro.done")
        elif figures != r.figures:
            self.store.update_rollout(r.id, figures=figures)

    def abort(self, r: RolloutRow, reason: str, figures: dict[str, Any], now: float,
              keep_updated: bool = False) -> None:
        """Stop the waves: unreleased devices are skipped; released ones go back to the version they ran
        before, except (``keep_updated``, an operator's choice) those that already applied it. Each step
        is idempotent, so an abort cut by a restart is finished by the next tick."""
        log.warning("rollout %s aborted: %s", r.id, reason)
        for s in self.store.slots(r.id):
            if s.status == "pending":
                self.store.update_slot(r.id, s.device_id, status="skipped", reason="rollout aborted")
            elif not (keep_updated and s.status == "applied"):
                self._send_back(r, s.device_id)
        self.store.update_rollout(r.id, expect=("running", "aborting"), status="aborted", reason=reason,
                                  figures=figures, finished=now)

    def release(self, r: RolloutRow, wave: int, now: float) -> None:
        devices = {d.id: d for d in self.registry.devices()}
        for s in self.store.slots(r.id):
            if s.wave != wave:
                continue
            dev = devices.get(s.device_id)
            prev = self.store.desired(s.device_id)
            prev_rid = (prev[0].rollout_id or "").split(":")[0] if prev else ""
            if prev_rid and prev_rid != r.id:
                old = self.store.slot(prev_rid, s.device_id)
                if old is not None and old.status in IN_PROGRESS:
                    self.store.update_slot(prev_rid, s.device_id, status="superseded", reason=f"superseded by {r.id}")
            self.store.update_slot(r.id, s.device_id, status="released", conf_before=live_confidence(dev))
            self.set_desired(s.device_id, r.bundle_sha256, r.version, r.id)
        self.store.update_rollout(r.id, wave=wave, wave_started=now, soak_started=None)
        failpoint("ro.wave.released")
        log.info("rollout %s: wave %d of %d released", r.id, wave + 1, r.waves)

    def _send_back(self, r: RolloutRow, device_id: str) -> None:
        """Abort or failure: the device's desired version goes back to what it ran before."""
        s = self.store.slot(r.id, device_id)
        cur = self.store.desired(device_id)
        if s is None or not s.from_sha256 or not cur or cur[0].rollout_id != r.id:
            return
        self.set_desired(device_id, s.from_sha256, s.from_version or "?", f"{r.id}:back")
        if s.status == "applied":
            self.store.update_slot(r.id, device_id, status="rolled_back", reason="rollout aborted")

    def _announce_desired(self, device_id: str, state: dict[str, Any]) -> None:
        """Every registered device has a retained desired version (dashboards: HA's update entity is
        never "unknown"): the rollout's when there is one, else what the device runs — once per
        device per controller session, and again only when a rollout changes it."""
        rows = self.store.desired(device_id)
        if rows:
            d = rows[0]
            body = {"version": d.version, "bundle_sha256": d.bundle_sha256, "rollout_id": d.rollout_id}
        else:
            m = state.get("model") or {}
            if not isinstance(m, dict) or not isinstance(m.get("version"), str):
                return   # no model yet: nothing to want
            body = {"version": m["version"], "bundle_sha256": m.get("bundle_sha256"), "rollout_id": None}
        if self.channel.set_desired(device_id, body):
            self.desired_announced.add(device_id)

    def set_desired(self, device_id: str, sha: str, version: str, rollout_id: str | None) -> None:
        self.store.set_desired(device_id, sha, version, rollout_id)
        self.last_offer.pop(device_id, None)
        self.last_want.pop(device_id, None)
        self.channel.set_desired(device_id, {"version": version, "bundle_sha256": sha, "rollout_id": rollout_id})

    # -- reconcile ----------------------------------------------------------------
    def reconcile(self, mono: float) -> None:
        for d in self.store.needing_attention(IN_PROGRESS):
            dev = self.registry.device(d.device_id)
            if dev is None or not dev.online:
                continue
            have = device_model(dev).get("bundle_sha256")
            rid = (d.rollout_id or "").split(":")[0]
            slot = self.store.slot(rid, d.device_id) if rid else None
            if have == d.bundle_sha256:
                if slot is not None and slot.status in IN_PROGRESS and not d.rollout_id.endswith(":back"):
                    self.store.update_slot(rid, d.device_id, status="applied", reason="reported by the device")
                    failpoint("ro.slot.applied")
                continue
            if slot is not None and slot.status in FAILED and not d.rollout_id.endswith(":back"):
                continue
            last = max(self.last_offer.get(d.device_id, -1e9), self.last_want.get(d.device_id, -1e9))
            if mono - last < self.reoffer_s:
                continue
            self.last_offer[d.device_id] = mono
            self.offer(dev, d, slot, rid)

    def offer(self, dev: "Device", d: Desired, slot: Any, rid: str) -> None:
        model = device_model(dev)
        have, have_version = model.get("bundle_sha256"), model.get("version")
        kept = {i.get("bundle_sha256") for i in model.get("installed") or [] if isinstance(i, dict)}
        if d.bundle_sha256 in kept:
            self.counts["rollback_commands"] += 1
            self.channel.command(dev.id, "model.rollback", {"bundle_sha256": d.bundle_sha256})
            return
        r = self.store.rollout(rid) if rid and not d.rollout_id.endswith(":back") else None
        art, reason = self.pick_artifact(have, d.bundle_sha256, r.artifact_id if r else None)
        if art is None:
            reason = f"{reason or 'no patch or bundle here'} takes {have_version or 'nothing'} to {d.version}"
            log.error("device %s: %s", dev.id, reason)
            if slot is not None and slot.status in IN_PROGRESS:
                self.store.update_slot(rid, dev.id, status="failed", reason=reason)
                r = self.store.rollout(rid)
                if r is not None:
                    self._send_back(r, dev.id)
            return
        data, manifest = self._blob(art)
        base = None
        if art.base_sha256:
            base_art = self.store.artifact(art.base_sha256)
            base = {"version": have_version if have == art.base_sha256 else (base_art.version if base_art else "?"),
                    "bundle_sha256": art.base_sha256}
        body = {"rollout_id": rid or None, "target": {"version": d.version, "bundle_sha256": d.bundle_sha256},
                "base": base, "transfer": manifest.to_dict(),
                "allow_downgrade": bool(have_version) and version_key(d.version) <= version_key(str(have_version))}
        if self.channel.send(dev.id, "model.offer", body):
            failpoint("ro.offer.sent")
            self.counts["offers"] += 1
            if slot is not None and slot.status == "released":
                self.store.update_slot(rid, dev.id, status="offered", offered=self.clock())

    def pick_artifact(self, have: str | None, want: str, own: str | None = None) -> tuple[Artifact | None, str]:
        """The artifact that takes bundle ``have`` to ``want``, or (None, why not). ``own`` is the
        rollout's artifact: when it is a patch, no other uploaded patch stands in for it."""
        usable = [a for a in self.store.artifacts_for(want) if a.usable]
        own_art = self.store.artifact(own) if own else None
        if own_art is not None and own_art.kind == "patch":
            if own_art.usable and (own_art.base_sha256 is None or (have and own_art.base_sha256 == have)):
                return own_art, ""
            uploaded = [a for a in usable if a.kind == "patch" and a.made_from is not None]   # ours only
        else:
            uploaded = [a for a in usable if a.kind == "patch"]
        bundle = next((a for a in usable if a.kind == "bundle"), None)
        key = self.channel.key
        if bundle is not None and key is not None and have:
            old = self.store.artifact(have)
            if old is not None and old.kind == "bundle" and old.usable:
                made = self._derived(bundle, old)
                if made is not None:
                    return made, ""
        delta = next((a for a in uploaded if have and a.base_sha256 == have), None)
        full = next((a for a in uploaded if a.base_sha256 is None), None)
        if delta or full:
            return delta or full, ""   # type: ignore[return-value]
        made = self._derived(bundle, None) if bundle is not None and key is not None else None
        if made is not None:
            return made, ""
        if own_art is not None and own_art.quarantined is not None:
            return None, f"the rollout's artifact {own_art.id[:12]} is quarantined ({own_art.quarantine_reason})"
        return None, ""

    def _derived(self, bundle: Artifact, old: Artifact | None) -> Artifact | None:
        """The patch from ``old`` (None: a full patch) to ``bundle`` that this controller made: the stored
        one when there is a usable one, else made now (patches carry a timestamp, so made once). None
        when the new one has the very bytes of a quarantined one."""
        base = old.id if old is not None else None
        for a in self.store.artifacts_for(bundle.id):
            if a.kind == "patch" and a.made_from == bundle.id and a.base_sha256 == base and a.usable:
                return a
        from protocol.patch import make_patch

        data, _ = make_patch(old.path if old is not None else None, bundle.path, self.channel.key)
        self.counts["patches_made"] += 1
        art = self.store.add_patch(data, made_from=bundle.id)
        return art if art.usable else None

    def _blob(self, art: Artifact) -> tuple[bytes, ChunkManifest]:
        hit = self._blobs.get(art.id)
        if hit is None:
            data = Path(art.path).read_bytes()
            hit = (data, make_manifest(art.id[:32], data, chunk_size_for(len(data))))
            self._blobs[art.id] = hit
            while len(self._blobs) > 4:
                self._blobs.popitem(last=False)
        self._blobs.move_to_end(art.id)
        return hit

    # -- inbound ----------------------------------------------------------------
    def on_message(self, leaf: str, env: Envelope) -> None:
        if leaf not in ("state", "events") or not self.owns(renew=False):
            return
        if leaf == "state" and env.body.get("status") == "online":
            self.last_offer.pop(env.sender, None)   # a (re)connect: reconcile it at once
            if env.sender not in self.desired_announced:
                self._announce_desired(env.sender, env.body)
            return
        if leaf == "events" and env.body.get("event") == "command.refused" and env.body.get("command") == "model.offer":
            # e.g. this controller has no signing key, or not the one the device trusts: say so now,
            # not at the wave timeout
            d = self.store.desired(env.sender)
            rid = (d[0].rollout_id or "") if d else ""
            slot = self.store.slot(rid, env.sender) if rid and ":" not in rid else None
            if slot is not None and slot.status in IN_PROGRESS:
                self.store.update_slot(rid, env.sender, status="failed",
                                       reason=f"offer refused: {env.body.get('reason')}")
                r = self.store.rollout(rid)
                if r is not None:
                    self._send_back(r, env.sender)
            return
        if leaf != "events" or env.body.get("event") != "model.update":
            return
        b = env.body
        try:
            ro.check_update_event(b)
        except DecodeError as exc:
            self.reject(exc.reason, f"dev/{env.sender}/events", str(exc))
            return
        if b["status"] == "failed" and is_integrity_refusal(b.get("reason")) and b.get("transfer_id"):
            self.quarantine(b["transfer_id"], f"{env.sender}: {b.get('reason')}")
        rid = b.get("rollout_id")
        slot = self.store.slot(rid, env.sender) if rid else None
        if slot is None or slot.status in FINAL:
            return
        status = "applied" if b["status"] == "unchanged" else b["status"]
        extra = {}
        if status == "healthy" and isinstance(b.get("eval_accuracy"), (int, float)) \
                and isinstance(b.get("current_accuracy"), (int, float)):
            extra = {"acc_before": float(b["current_accuracy"]), "acc_after": float(b["eval_accuracy"])}
        self.store.update_slot(rid, env.sender, status=status, reason=b.get("reason") or None, **extra)
        if status == "applied":
            failpoint("ro.slot.applied")
        if status in FAILED:
            r = self.store.rollout(rid)
            if r is not None:
                self._send_back(r, env.sender)

    def quarantine(self, transfer_id: str, reason: str) -> None:
        """Never offer the artifact of this transfer again (a board found its bytes bad)."""
        art = self.store.artifact_by_transfer(transfer_id)
        if art is None or not self.store.quarantine(art.id, reason):
            return
        self.store.commit()
        self._blobs.pop(art.id, None)
        self.counts["quarantined"] += 1
        log.warning("artifact %s (%s %s) quarantined: %s", art.id[:12], art.kind, art.version, reason)

    def on_want(self, device_id: str, msg: Message) -> None:
        """``xfer.want`` from a device: send it the chunks it lacks of the artifact it was offered
        (by the owner of the rollouts only: every replica hears the want, one answers it)."""
        if not self.owns(renew=False):
            self.counts["not_owner"] += 1
            return
        try:
            env = env_mod.decode(msg.payload, max_bytes=self.max_message_bytes, expect_sender=device_id)
        except DecodeError as exc:
            self.reject(exc.reason, msg.topic, str(exc))
            return
        if env.kind != "xfer.want":
            self.reject("kind_topic_mismatch", msg.topic, f"kind {env.kind!r} on a transfer topic")
            return
        tid = env.body["transfer_id"]
        art = self.store.artifact_by_transfer(tid)
        want = self.store.desired(device_id)
        if art is not None and art.quarantined is not None:
            self.reject("quarantined_artifact", msg.topic, f"{device_id} asked for transfer {tid!r}, whose "
                                                                "artifact is quarantined")
            return
        if (art is None or not want or want[0].bundle_sha256 != art.bundle_sha256) \
                and not (art is not None and self._relay_may_fetch(device_id, art)):
            self.reject("unknown_transfer", msg.topic, f"{device_id} asked for transfer {tid!r}, "
                                                            "which it was not offered")
            return
        self.last_want[device_id] = time.monotonic()
        _, manifest = self._blob(art)
        for i in env.body["chunks"]:
            if i >= manifest.count:
                self.reject("bad_chunk_index", msg.topic, f"chunk {i} of a {manifest.count}-chunk transfer")
                continue
            if not self.rate:
                self._send_chunk(device_id, art, i)
            elif (device_id, art, i) not in self._queued and len(self._queue) < 100_000:
                self._queue.append((device_id, art, i))
                self._queued.add((device_id, art, i))

    def _relay_may_fetch(self, device_id: str, art: Artifact) -> bool:
        """A site relay may pull an artifact that a board of its site is wanted to install (the
        relay's answer is cached for a few seconds: a pull asks thousands of times)."""
        key = (device_id, art.bundle_sha256)
        now = time.monotonic()
        hit = self._relay_ok.get(key)
        if hit is not None and now - hit[1] < 5.0:
            return hit[0]
        dev = self.registry.device(device_id)
        ok = False
        if dev is not None and (dev.state or {}).get("role") == "relay" and getattr(dev, "site", None):
            wanted = {d.device_id for d in self.store.desired() if d.bundle_sha256 == art.bundle_sha256}
            ok = any(getattr(self.registry.device(i), "site", None) == dev.site for i in wanted)
        if len(self._relay_ok) > 1000:
            self._relay_ok.clear()
        self._relay_ok[key] = (ok, now)
        if ok:
            self.counts["relay_wants"] += 1
        return ok

    def _send_chunk(self, device_id: str, art: Artifact, i: int) -> int:
        """One signed chunk frame to the device; returns the bytes sent (0 when it could not be)."""
        data, manifest = self._blob(art)
        tid = manifest.transfer_id
        blob = data[i * manifest.chunk_size:(i + 1) * manifest.chunk_size]
        if self.channel.send_frame(device_id, "xfer.chunk", {"transfer_id": tid, "index": i}, blob=blob):
            self.counts["chunks_sent"] += 1
            self.counts["bytes_sent"] += len(blob)
            self._sent_of[tid] = self._sent_of.get(tid, 0) + 1
            if self._sent_of[tid] == max(1, manifest.count // 2):
                failpoint("ro.chunk.sent")
            return len(blob)
        return 0
