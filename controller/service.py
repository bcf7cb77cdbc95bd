"""``fleetctl serve``: ingest the fleet's state, telemetry and events into the registry.

Every message is validated (envelope, kind matches the topic leaf, sender matches
the device id in the topic); a bad one is logged with its reason and counted in the
registry's ``rejects`` table, and ingestion goes on. Valid ones are stored in batches by the
registry writer (controller/ingest.py), which acknowledges each MQTT message only once the batch
holding it committed. The controller's own figures go out on ``ctl/telemetry`` and into the
registry for ``fleetctl status``.

Replicas (``[controller] replica``): several services share one fleet. Telemetry and results
come through MQTT 5 shared subscriptions (``$share/edgefleet-ctl/…``: the broker hands each
message to one replica); states, events and the devices' data topics (federated updates,
chunk requests) reach every replica, and only the owner of a run or of the rollouts (a lease,
controller/lease.py) acts on them. On a broker that speaks only MQTT 3.1.1 there are no shared
subscriptions: a replica refuses to run there, and says so.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from typing import Any, Callable

from protocol import envelope as env_mod
from protocol import rollout as _rollout_kinds  # noqa: F401 - registers model.offer / xfer.* kinds
from protocol.envelope import DecodeError, Envelope, encode
from protocol.mqttlink import Message, MqttLink, Will
from protocol.topics import Topics

from .channel import ControlChannel, load_signing_key
from .config import ControllerConfig
from .fl.runner import RoundRunner
from .fl.store import RoundStore
from .ingest import IngestWriter, Item, WriterSettings
from .lease import Leases
from .link import make_link
from .metrics import make_metrics
from .offload.tuning import adjust_threshold
from .provisioning.service_hook import make_provisioner
from .registry import Registry, WriteResult
from .rollouts.runner import RolloutRunner
from .rollouts.store import RolloutStore

log = logging.getLogger("fleetctl.serve")

# which envelope kind may appear on which device leaf
LEAF_KINDS = {"state": ("state",), "telemetry": ("telemetry",), "events": ("event",), "reply": ("reply",),
              "results": ("result",)}

#: the shared-subscription group every replica joins (MQTT 5 ``$share/<group>/<filter>``)
SHARE_GROUP = "edgefleet-ctl"
#: leaves each message of which one replica takes; the rest reach every replica
SHARED_LEAVES = ("telemetry", "results")


class ReplicaRefused(RuntimeError):
    """This replica cannot share the fleet here (a 3.1.1-only broker has no shared subscriptions)."""


class ControllerService:
    def __init__(self, cfg: ControllerConfig, registry: Registry | None = None, *,
                 metrics_port: int | None = None) -> None:
        self.cfg = cfg
        self.replica = cfg.controller.replica
        self.owner = f"{cfg.controller.id}-{self.replica}" if self.replica else cfg.controller.id
        self.topics = Topics(cfg.mqtt.topic_root)
        self.registry = registry or open_registry(cfg)
        self.writer: IngestWriter | None = None
        self.started = time.time()
        self.link: MqttLink | None = None
        self.counts: Counter[str] = Counter()
        self.listeners: list[Callable[[str, Envelope], None]] = []
        self.workers: dict[str, dict[str, Any]] = {}
        self.signing_key = load_signing_key(cfg.security.signing_key)
        self.channel = ControlChannel(self.topics, cfg.controller.id, self._publish, self.signing_key,
                                      connected=lambda: self.link is not None and self.link.connected.is_set(),
                                      publish_acked=self._publish_acked)
        # the runners get what they use, never the service itself
        rollout_store = RolloutStore(self.registry.db, cfg.artifacts_dir)
        self.leases = Leases(self.registry.db, self.owner, cfg.controller.lease_ttl_s)
        self.rollouts = RolloutRunner(self.channel, self.registry, rollout_store, cfg, self.reject,
                                      leases=self.leases)
        self.listeners.append(self.rollouts.on_message)
        self.rounds = RoundRunner(self.channel, self.registry, RoundStore(self.registry.db), rollout_store, cfg,
                                  self.reject, leases=self.leases)
        self.provisioning = make_provisioner(cfg, self.registry.db, self.topics, self._publish, self.channel.command,
                                             self.reject)
        self.fatal: str | None = None
        self._stop: asyncio.Event | None = None
        self.online: set[str] = set()
        self.known = 0
        self._stamps: dict[int, float] = {}
        self.metrics_port = cfg.metrics.port if metrics_port is None else metrics_port
        self.metrics = make_metrics(cfg.metrics, metrics_port, gauges={
            "edgefleet_devices_online": lambda: len(self.online),
            "edgefleet_devices_known": lambda: self.known,
            "edgefleet_inbound_queue": lambda: (self.link.messages.qsize() if self.link else 0)
            + (self.writer.pending if self.writer else 0),
            "edgefleet_rounds_running": lambda: self.rounds.counts.get("running", 0),
            "edgefleet_rollouts_running": lambda: self.rollouts.counts.get("running", 0),
            "edgefleet_leases_held": lambda: len(self.leases.held()),
            "edgefleet_mqtt_connected": lambda: 1 if self.link is not None and self.link.connected.is_set() else 0,
        }, counters={
            "edgefleet_dropped": lambda: sum(self.writer.shed.values()) if self.writer else 0,
            "edgefleet_round_tasks_sent": lambda: self.rounds.counts["tasks_sent"],
            "edgefleet_round_updates": lambda: self.rounds.counts["updates"],
            "edgefleet_rollout_chunks_sent": lambda: self.rollouts.counts["chunks_sent"],
        })

    def subscriptions(self) -> list[tuple[str, int]]:
        """What this service subscribes to: with replicas, the shared leaves through ``$share``."""
        subs = []
        for leaf in ("state", "telemetry", "events", "results"):
            flt = self.topics.all_devices(leaf)
            if self.replica and leaf in SHARED_LEAVES:
                flt = f"$share/{SHARE_GROUP}/{flt}"
            subs.append((flt, 1))
        subs.append((f"{self.topics.base}/dev/+/data/#", 1))
        subs.append((f"{self.topics.base}/offload/workers/+", 0))
        subs += self.provisioning.subscriptions() if self.provisioning else []
        return subs

    @property
    def ctl_state_topic(self) -> str:
        """Replicas each keep their own retained state (and last will) under ``ctl/state/<replica>``."""
        return f"{self.topics.ctl_state}/{self.replica}" if self.replica else self.topics.ctl_state

    def _publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        return self.link is not None and self.link.publish(topic, payload, qos, retain)

    def _publish_acked(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False):
        if self.link is None:
            fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            fut.set_result(False)
            return fut
        return self.link.publish_acked(topic, payload, qos, retain)

    def _ctl_state(self, status: str) -> bytes:
        body: dict[str, Any] = {"status": status}
        if self.replica:
            body["replica"] = self.replica
        return encode(Envelope(kind="ctl.state", sender=self.cfg.controller.id, body=body))

    async def _on_connect(self) -> None:
        if not self.link:
            return
        if self.replica and not self.link.is_v5:
            self.fatal = (f"controller.replica is {self.replica!r}, but the broker {self.cfg.mqtt.broker} speaks "
                          "MQTT 3.1.1 only: replicas share the fleet through MQTT 5 shared subscriptions. "
                          "Run one controller (no controller.replica) on this broker, or use an MQTT 5 broker")
            log.error("%s", self.fatal)
            if self._stop is not None:
                self._stop.set()
            return
        self.link.publish(self.ctl_state_topic, self._ctl_state("online"), 1, True)

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        self._stop = stop
        if self.replica and self.cfg.mqtt.protocol == "3.1.1":
            self.fatal = (f"controller.replica is {self.replica!r} but mqtt.protocol is 3.1.1: replicas need "
                          "MQTT 5 shared subscriptions (set mqtt.protocol to auto or 5, or run one controller)")
            log.error("%s", self.fatal)
            raise ReplicaRefused(self.fatal)
        client_id = f"{self.cfg.controller.id}-serve" + (f"-{self.replica}" if self.replica else "")
        self.link = make_link(self.cfg, client_id, will=Will(self.ctl_state_topic, self._ctl_state("offline")),
                              subscriptions=self.subscriptions(), on_connect=self._on_connect, persistent=True,
                              manual_ack=True)
        devs = self.registry.devices()
        self.known = len(devs)
        self.online = {d.id for d in devs if d.online}
        if self.metrics.enabled:
            self.metrics_port = self.metrics.serve(self.cfg.metrics.host, self.metrics_port)
        reg_url = self.registry.path
        self.writer = IngestWriter(lambda: open_registry(self.cfg, reg_url), self._committed,
                                   WriterSettings(batch_max=self.cfg.registry.batch_max,
                                                  flush_s=self.cfg.registry.flush_ms / 1000))
        self.writer.start()
        await self.link.start()
        pump = asyncio.create_task(self._pump(), name="ingest")
        ctl_tel = asyncio.create_task(self._ctl_telemetry(), name="ctl-telemetry")
        sweeper = asyncio.create_task(self._sweep(), name="offline-sweep")
        rounds = asyncio.create_task(self.rounds.run(), name="rounds")
        tuner = asyncio.create_task(self._offload_tuner(), name="offload-tuner")
        rollouts = asyncio.create_task(self.rollouts.run(), name="rollouts")
        tasks = (pump, sweeper, rounds, tuner, rollouts, ctl_tel) + ((asyncio.create_task(
            self.provisioning.run(), name="provisioning"),) if self.provisioning else ())
        if ready:
            ready()
        try:
            await stop.wait()
        finally:
            if self.link.connected.is_set() and not self.fatal:
                await self.link.publish_and_wait(self.ctl_state_topic, self._ctl_state("offline"), 1, True, 1.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._commit_own()
            self.writer.set_meta(self._stats_key, self.figures())
            await self.writer.stop()   # commits and acknowledges what it holds, while the link is up
            await self.link.stop()
            self._commit_own()
            self.leases.release_all()
            self.metrics.close()
        if self.fatal:
            raise ReplicaRefused(self.fatal)

    async def _pump(self) -> None:
        assert self.link is not None and self.writer is not None
        q = self.link.messages
        while True:
            burst = [await q.get()]
            while not q.empty() and len(burst) < 500:
                burst.append(q.get_nowait())
            items = [self._safe_classify(m) for m in burst]
            self._commit_own()   # what the runners wrote for these (updates, transfers) before any ack
            for msg, item in zip(burst, items):
                await self.writer.put(msg, item)   # waits while the writer is behind: flow control
            await asyncio.sleep(0)  # let the runners and the sweeper in between bursts

    def _commit_own(self) -> None:
        """Commit the service's own connection; a registry that went away is logged, not fatal (the
        connection re-opens on next use; the writer retries its batches itself)."""
        try:
            self.registry.commit()
        except Exception as exc:  # noqa: BLE001 - sqlite3/psycopg errors, DatabaseUnavailable
            log.warning("registry commit failed: %s", exc)
            try:
                self.registry.rollback()
            except Exception:  # noqa: BLE001
                pass

    def _committed(self, msgs: list[Message], result: WriteResult) -> None:
        """The writer committed a batch: acknowledge its messages (in order), count duplicates."""
        self.counts["duplicates"] += result.duplicates
        if self.metrics.enabled:
            now, stamps = time.time(), self._stamps
            self.metrics.lags([now - stamps.pop(id(m)) for m in msgs if id(m) in stamps])
            w = self.writer.write_ms if self.writer else None
            self.metrics.commit(w[-1] / 1000 if w else 0.0, len(msgs))
        if self.link is not None:
            for m in msgs:   # acknowledged only once stored: a crash before this and the broker re-sends
                self.link.ack(m)

    def _safe_classify(self, msg: Message) -> Item | None:
        try:
            item = self.classify(msg)
            if item is not None and self.metrics.enabled:
                self._stamps[id(msg)] = item[1].ts    # the ingest lag, observed once it is committed
            return item
        except Exception:  # noqa: BLE001 - our bug; survive and count
            log.exception("internal error ingesting %s", msg.topic)
            self.reject("internal_error", msg.topic, "internal error")
            return None

    @property
    def _stats_key(self) -> str:
        return f"ctl.stats.{self.cfg.controller.id}"

    def figures(self) -> dict[str, Any]:
        """The controller's own telemetry: what came in, what was stored, shed, rejected, and how fast."""
        link = self.link
        return {"controller": self.cfg.controller.id, "ts": time.time(), "uptime_s": round(time.time() - self.started, 1),
                "registry": self.registry.backend, "messages": dict(self.counts),
                "ingest": self.writer.figures() if self.writer else {},
                # taken off the wire but never acknowledged (shutting down with a full hand-off): the
                # broker sends them again, so this is not a loss
                "link": {"connected": bool(link and link.connected.is_set()),
                         "not_taken": link.dropped_incoming if link else 0,
                         "handoff_queued": link.messages.qsize() if link else 0}}

    async def _ctl_telemetry(self) -> None:
        """Every ``controller.telemetry_interval_s``: ``ctl/telemetry`` (retained) and the registry row."""
        while True:
            await asyncio.sleep(self.cfg.controller.telemetry_interval_s)
            figs = self.figures()
            if self.writer:
                self.writer.set_meta(self._stats_key, figs)
            try:
                payload = encode(Envelope(kind="ctl.telemetry", sender=self.cfg.controller.id, body=figs))
            except ValueError:
                continue
            self._publish(self.topics.ctl_telemetry, payload, 0, True)

    async def _sweep(self) -> None:
        limit = self.cfg.controller.offline_after_s
        cursor = ""
        while True:
            await asyncio.sleep(max(1.0, limit / 4) if limit else 60)
            now = time.time()
            self._commit_own()     # the lease write commits this connection: nothing half-done in it
            if limit and self.leases.holds("sweeper", now):
                for dev, last_seen in self.registry.silent_online(now - limit):
                    log.info("device %s silent for %.0fs: marking offline", dev, now - last_seen)
                    self.registry.mark_offline(dev, now)
                    self.online.discard(dev)
            # age retention for devices that went quiet (the writer prunes the others as they send)
            try:
                cursor, _ = self.registry.prune_slice(cursor, 100, now)
            except Exception as exc:  # noqa: BLE001 - the registry is away: next time
                log.warning("retention sweep failed: %s", exc)
            self._commit_own()

    def reject(self, reason: str, topic: str, detail: str) -> None:
        self.counts["rejected"] += 1
        self.metrics.reject(reason)
        if self.writer is not None:
            self.writer.reject(reason)
        else:
            self.registry.count_reject(reason)
        log.warning("rejected message on %s: %s", topic, detail)

    async def _offload_tuner(self) -> None:
        """Move devices' offload thresholds by the documented feedback rule (controller/offload/tuning.py)."""
        last: dict[str, tuple[int, int, int]] = {}
        while True:
            await asyncio.sleep(self.cfg.controller.offload_tune_interval_s)
            if not self.cfg.controller.offload_auto_tune or self.link is None or not self.leases.holds("offload-tuner"):
                continue
            now = time.time()
            utils = [w["utilisation"] for w in self.workers.values() if now - w.get("_seen", 0) < 120]
            if not utils:
                continue
            devs = [d for d in self.registry.devices() if d.online and ((d.telemetry or {}).get("offload") or {})
                    .get("enabled")]
            req = tmo = dis = 0
            for d in devs:
                o = d.telemetry["offload"]
                cur = (int(o.get("offloaded") or 0), int(o.get("timeouts") or 0),
                       int(round((1 - (o.get("agreement") or 1.0)) * (o.get("remote_ok") or 0))))
                prev = last.get(d.id, (0, 0, 0))
                req, tmo, dis = req + cur[0] - prev[0], tmo + cur[1] - prev[1], dis + cur[2] - prev[2]
                last[d.id] = cur
            if not devs:
                continue
            thresholds = sorted(d.telemetry["offload"]["threshold"] for d in devs)
            current = thresholds[len(thresholds) // 2]
            new, why = adjust_threshold(current, sum(utils) / len(utils), tmo / max(1, req), dis / max(1, req))
            if new != current:
                log.info("offload threshold %.3f -> %.3f: %s", current, new, why)
                for d in devs:
                    self.send_command(d.id, "offload.set", {"threshold": new})

    def send_command(self, device_id: str, command: str, args: dict[str, Any]) -> bool:
        """Fire-and-forget signed command from the service (the reply lands in the device's subtree)."""
        return self.channel.command(device_id, command, args)

    def ingest(self, msg: Message) -> Envelope | None:
        """Validate one message and store it now on the service's own connection (uncommitted: the
        caller commits). ``fleetctl serve`` goes through ``classify`` and the writer instead."""
        item = self.classify(msg)
        if item is None:
            return None
        self.counts["duplicates"] += self.registry.write([item]).duplicates
        return item[1]

    def classify(self, msg: Message) -> Item | None:
        """Validate one message; returns what the registry is to store, or None (rejected, or handled
        here: worker status, federated updates, transfer requests, claims, renewals)."""
        if self.provisioning is not None and self.provisioning.handles(msg):
            return None
        if msg.topic.startswith(f"{self.topics.base}/offload/workers/"):
            if msg.payload:
                try:
                    env = env_mod.decode(msg.payload)
                    self.workers[env.sender] = {**dict(env.body), "_seen": time.time()}
                except DecodeError as exc:
                    self.reject(exc.reason, msg.topic, str(exc))
            return None
        parsed = self.topics.parse(msg.topic)
        if parsed is None:
            self.reject("bad_topic", msg.topic, "not a device topic (or invalid device id)")
            return None
        device_id, leaf, rest = parsed
        if leaf == "state" and not msg.payload:
            return None  # retained state cleared by an operator
        if leaf == "data":
            if rest == ("fl",):
                self.rounds.on_update_message(device_id, msg)
            elif rest == ("xfer",):
                self.rollouts.on_want(device_id, msg)
            elif rest == ("cert",) and self.provisioning is not None:
                self.provisioning.on_renew(device_id, msg.payload)
            else:
                self.reject("bad_topic", msg.topic, "no handler for this data topic")
            return None
        try:
            env = env_mod.decode(msg.payload, max_bytes=self.cfg.mqtt.max_message_bytes, expect_sender=device_id)
        except DecodeError as exc:
            self.reject(exc.reason, msg.topic, str(exc))
            return None
        if env.kind not in LEAF_KINDS.get(leaf, ()):
            self.reject("kind_topic_mismatch", msg.topic, f"kind {env.kind!r} does not belong on /{leaf}")
            return None
        self.counts[leaf] += 1
        self.metrics.message(leaf)
        if leaf == "state":
            if env.body.get("status") == "online":
                if env.sender not in self.online:
                    self.online.add(env.sender)
                    self.known = max(self.known, len(self.online))
            else:
                self.online.discard(env.sender)
        for fn in self.listeners:
            fn(leaf, env)
        if leaf == "telemetry":
            return (leaf, env, msg.payload)   # stored as received: never serialised again
        return (leaf, env) if leaf in ("state", "events", "results") else None


def open_registry(cfg: ControllerConfig, url: str | None = None) -> Registry:
    """The registry ``cfg`` names, with its retention settings (``url``: another connection to the same one)."""
    r = cfg.registry
    return Registry(url or cfg.db_path, telemetry_keep=r.telemetry_keep_per_device,
                    events_keep=r.events_keep_per_device, telemetry_max_age_s=r.telemetry_max_age_s,
                    events_max_age_s=r.events_max_age_s)


def pretty(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
