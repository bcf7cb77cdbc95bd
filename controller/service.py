"""``fleetctl serve``: ingest the fleet's state, telemetry and events into the registry.

Every message is validated (envelope, kind matches the topic leaf, sender matches
the device id in the topic); a bad one is logged with its reason and counted in the
registry's ``rejects`` table, and ingestion goes on.

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
from pathlib import Path
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
from .lease import Leases
from .link import make_link
from .metrics import NoMetrics, make_metrics
from .offload.tuning import adjust_threshold
from .registry import Registry
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
        self.registry = registry or Registry(cfg.db_path, telemetry_keep=cfg.registry.telemetry_keep_per_device,
                                             events_keep=cfg.registry.events_keep_per_device)
        self.link: MqttLink | None = None
        self.counts: Counter[str] = Counter()
        self.listeners: list[Callable[[str, Envelope], None]] = []
        self.workers: dict[str, dict[str, Any]] = {}
        self.signing_key = load_signing_key(cfg.security.signing_key)
        self.channel = ControlChannel(self.topics, cfg.controller.id, self._publish, self.signing_key,
                                      connected=lambda: self.link is not None and self.link.connected.is_set(),
                                      publish_acked=self._publish_acked)
        # the runners get what they use, never the service itself
        rollout_store = RolloutStore(self.registry.db, Path(cfg.db_path).parent / "artifacts")
        self.leases = Leases(self.registry.db, self.owner, cfg.controller.lease_ttl_s)
        self.rollouts = RolloutRunner(self.channel, self.registry, rollout_store, cfg, self.reject,
                                      leases=self.leases)
        self.listeners.append(self.rollouts.on_message)
        self.rounds = RoundRunner(self.channel, self.registry, RoundStore(self.registry.db), rollout_store, cfg,
                                  self.reject, leases=self.leases)
        self.fatal: str | None = None
        self._stop: asyncio.Event | None = None
        self.online: set[str] = set()
        self.known = 0
        self.metrics_port = cfg.metrics.port if metrics_port is None else metrics_port
        self.metrics = make_metrics(cfg.metrics, metrics_port, gauges={
            "edgefleet_devices_online": lambda: len(self.online),
            "edgefleet_devices_known": lambda: self.known,
            "edgefleet_inbound_queue": lambda: self.link.messages.qsize() if self.link else 0,
            "edgefleet_rounds_running": lambda: self.rounds.counts.get("running", 0),
            "edgefleet_rollouts_running": lambda: self.rollouts.counts.get("running", 0),
            "edgefleet_leases_held": lambda: len(self.leases.held()),
            "edgefleet_mqtt_connected": lambda: 1 if self.link is not None and self.link.connected.is_set() else 0,
        }, counters={
            "edgefleet_dropped": lambda: self.link.dropped_incoming if self.link else 0,
            "edgefleet_round_tasks_sent": lambda: self.rounds.counts["tasks_sent"],
            "edgefleet_round_updates": lambda: self.rounds.counts["updates"],
            "edgefleet_rollout_chunks_sent": lambda: self.rollouts.counts["chunks_sent"],
        })

    def subscriptions(self, v5: bool = True) -> list[tuple[str, int]]:
        """What this service subscribes to: with replicas, the shared leaves through ``$share``."""
        subs = []
        for leaf in ("state", "telemetry", "events", "results"):
            flt = self.topics.all_devices(leaf)
            if self.replica and leaf in SHARED_LEAVES:
                flt = f"$share/{SHARE_GROUP}/{flt}"
            subs.append((flt, 1))
        subs.append((f"{self.topics.base}/dev/+/data/#", 1))
        subs.append((f"{self.topics.base}/offload/workers/+", 0))
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
        client_id = f"{self.cfg.controller.id}-serve" + (f"-{self.replica}" if self.replica else "")
        self.link = make_link(self.cfg, client_id,
                              will=Will(self.ctl_state_topic, self._ctl_state("offline")),
                              subscriptions=self.subscriptions(), on_connect=self._on_connect, persistent=True,
                              manual_ack=True)
        if self.replica and self.cfg.mqtt.protocol == "3.1.1":
            self.fatal = (f"controller.replica is {self.replica!r} but mqtt.protocol is 3.1.1: replicas need "
                          "MQTT 5 shared subscriptions (set mqtt.protocol to auto or 5, or run one controller)")
            log.error("%s", self.fatal)
            raise ReplicaRefused(self.fatal)
        devs = self.registry.devices()
        self.known = len(devs)
        self.online = {d.id for d in devs if d.online}
        if self.metrics.enabled:
            self.metrics_port = self.metrics.serve(self.cfg.metrics.host, self.metrics_port)
        await self.link.start()
        pump = asyncio.create_task(self._pump(), name="ingest")
        sweeper = asyncio.create_task(self._sweep(), name="offline-sweep")
        rounds = asyncio.create_task(self.rounds.run(), name="rounds")
        tuner = asyncio.create_task(self._offload_tuner(), name="offload-tuner")
        rollouts = asyncio.create_task(self.rollouts.run(), name="rollouts")
        tasks = (pump, sweeper, rounds, tuner, rollouts)
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
            await self.link.stop()
            self.registry.commit()
            self.leases.release_all()
            self.metrics.close()
        if self.fatal:
            raise ReplicaRefused(self.fatal)

    async def _pump(self) -> None:
        assert self.link is not None
        link = self.link
        q = link.messages
        metrics = self.metrics
        while True:
            batch = [await q.get()]
            stamps: list[float] = []
            self._safe_ingest(batch[0], stamps)
            while not q.empty() and len(batch) < 1000:  # drain a burst, then commit once
                batch.append(q.get_nowait())
                self._safe_ingest(batch[-1], stamps)
            t0 = time.perf_counter()
            self.registry.commit()
            if metrics.enabled:
                now = time.time()
                metrics.commit(time.perf_counter() - t0, len(batch))
                metrics.lags([now - ts for ts in stamps])
            for msg in batch:  # acknowledged only once stored: a crash before this and the broker re-sends
                link.ack(msg)
            await asyncio.sleep(0)  # let the runners and the sweeper in between bursts

    def _safe_ingest(self, msg: Message, stamps: list[float] | None = None) -> None:
        try:
            env = self.ingest(msg)
            if env is not None and stamps is not None:
                stamps.append(env.ts)
        except Exception:  # noqa: BLE001 - our bug; survive and count
            log.exception("internal error ingesting %s", msg.topic)
            self.reject("internal_error", msg.topic, "internal error")

    async def _sweep(self) -> None:
        limit = self.cfg.controller.offline_after_s
        while True:
            await asyncio.sleep(max(1.0, limit / 4) if limit else 3600)
            if limit and self.leases.holds("sweeper"):
                now = time.time()
                for d in self.registry.devices():
                    if d.online and now - d.last_seen > limit:
                        log.info("device %s silent for %.0fs: marking offline", d.id, now - d.last_seen)
                        self.registry.mark_offline(d.id, now)
                        self.online.discard(d.id)
                self.registry.commit()

    def reject(self, reason: str, topic: str, detail: str) -> None:
        self.counts["rejected"] += 1
        self.metrics.reject(reason)
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
        """Validate one message and store it. Returns the envelope, or None if rejected."""
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
        if leaf == "state":
            self.registry.record_state(env)
            if env.sender not in self.online and env.body.get("status") == "online":
                self.online.add(env.sender)
                self.known = max(self.known, len(self.online))
            elif env.body.get("status") != "online":
                self.online.discard(env.sender)
        elif leaf == "telemetry":
            if not self.registry.record_telemetry(env):
                self.counts["duplicates"] += 1
                self.metrics.duplicate(leaf)
        elif leaf == "events":
            if not self.registry.record_event(env):
                self.counts["duplicates"] += 1
                self.metrics.duplicate(leaf)
        elif leaf == "results":
            self.registry.record_result(env)
        self.counts[leaf] += 1
        self.metrics.message(leaf)
        for fn in self.listeners:
            fn(leaf, env)
        return env


def pretty(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True)
