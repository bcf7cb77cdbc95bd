"""The edge-agent daemon: the lifecycle, the MQTT link, and the features composed on it.

Lifecycle (uvicorn's shape): the CLI captures signals and loads config → ``Agent.run`` starts
the features, connects, announces itself (retained state, HA discovery), publishes telemetry on
an interval and routes messages → on stop it publishes ``offline``, flushes and returns.

``Agent`` is the ``AgentContext`` its features are handed (agent/core/context.py). Routing is
owned by subscriptions: the controller channel (device and group cmd topics, signed when
required) and the request topic dispatch by envelope kind to what the features declared; a
feature's own topics (the offload replies) go straight to its handler. Every inbound message is
validated; a bad one is logged with its reason, counted, and the loop goes on. This is the only
module that knows the features; none of them imports it.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from protocol import envelope as env_mod
from protocol.binary import Frame, decode_frame, is_frame
from protocol.envelope import DecodeError, Envelope, encode
from protocol.mqttlink import Message, MqttLink, Will
from protocol.topics import Topics

from . import __version__
from .core import hass, sysinfo
from .core.config import AgentConfig, ConfigError
from .core.context import CommandError, CommandHandler, Feature, KindHandler, Subscription
from .core.counters import Counters
from .core.outbox import Outbox, OutboxFull

log = logging.getLogger("edge_agent")

#: signed kinds whose replay cannot change anything (the receiver checks and dedupes them itself)
HARMLESS_REPLAYS = frozenset({"xfer.chunk"})
#: commands that only read: a replay after a restart changes nothing, so their replay mark is
#: checked but not fsynced (the next durable command saves it) — an fsync per ping cost ~5-15 ms
READ_ONLY_COMMANDS = frozenset({"ping", "describe", "model.describe", "telemetry.now", "offload.status"})

if TYPE_CHECKING:  # pragma: no cover
    from protocol.cmdauth import CommandVerifier

    from .serving.feature import Serving


def salvage_reply(msg: Message) -> Envelope | None:
    """Where to send the error reply for a message we cannot decode: MQTT 5 response topic and
    correlation data (properties, not the payload), else the ``reply_to``/``corr`` read from what
    can be read cheaply: a frame's header alone, or the bounded ends of a JSON envelope (the
    encoder writes ``reply_to``/``corr`` after the body). None: nobody to tell."""
    from protocol.salvage import reply_fields

    rt, corr = msg.response_topic, msg.correlation.decode("utf-8", "replace") if msg.correlation else None
    if not rt:
        rt, corr2 = reply_fields(msg.payload)
        corr = corr or corr2
    if not rt:
        return None
    return Envelope(kind="infer.request", sender="unknown", reply_to=rt, corr=corr)


def compose(ctx: "Agent") -> list[Feature]:
    """The board's features, in start order, each handed the siblings it uses."""
    from .learning.feature import Adaptation
    from .offload.feature import Offloader
    from .offload.policy import OffloadPolicy
    from .serving.feature import Serving
    from .updates.feature import Updater

    cfg = ctx.cfg
    oc = cfg.offload
    serving = Serving(ctx, runtimes=ctx.runtimes)
    offloader = Offloader(ctx, OffloadPolicy(enabled=oc.enabled, threshold=oc.threshold, mode=oc.mode,
                                             deadline_ms=oc.deadline_ms, margin_ms=oc.margin_ms),
                          engine=lambda: serving.engine)
    serving.resolver = offloader
    mcu = None
    if cfg.bridge.enabled:
        from .mcu.feature import McuBridge

        mcu = McuBridge(ctx, serving)
    features: list[Feature] = [serving, offloader, Updater(ctx, serving, mcu=mcu), Adaptation(ctx, serving)]
    if mcu is not None:
        features.append(mcu)
    from .logs.feature import RemoteLogs

    features.append(RemoteLogs(ctx))
    if cfg.mqtt.cert_file and cfg.provisioning.rotate:
        from .provisioning.rotation import CertRotation

        features.append(CertRotation(ctx, reconnect=lambda tls: ctx.link.reconnect_with(tls)))
    return features


class Agent:
    def __init__(self, cfg: AgentConfig, features: "Callable[[Agent], list[Feature]] | None" = None) -> None:
        self.cfg = cfg
        self.device_id = cfg.device.id
        self.topics = Topics(cfg.mqtt.topic_root)
        self.counters = Counters(self.topics, cfg.homeassistant.prefix)
        self.started = time.monotonic()
        self.seq = 0
        self.link: MqttLink | None = None
        self._telemetry_now = asyncio.Event()
        self._stopping = False
        self.verifier = self._make_verifier()
        try:
            self.outbox = Outbox(Path(cfg.state.dir) / "outbox.db", cfg.state.outbox_bytes)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state.dir {cfg.state.dir}: cannot open the outbox there: {exc}") from None
        self._announced = hass.Announced(Path(cfg.state.dir) / "hass-announced.json")
        self._draining = False
        self._drain_task: asyncio.Future | None = None
        self._inflight: set[asyncio.Future] = set()
        self.max_inflight_requests = 256
        self.notifier: Any = None  # systemd notifier (agent.core.sdnotify), set by the CLI
        from .serving.runtimes import available_runtimes

        self.runtimes = available_runtimes()
        self.features: list[Feature] = (features or compose)(self)
        # filled from the features' declarations in start()
        self.commands: dict[str, CommandHandler] = {}
        self.control_handlers: dict[str, KindHandler] = {}
        self.request_handlers: dict[str, KindHandler] = {}
        self.subscriptions: dict[str, Subscription] = {}
        self._started = False

    def feature(self, kind: type) -> Any:
        """The composed feature of this class (tests and the CLI look features up; features don't)."""
        return next((f for f in self.features if isinstance(f, kind)), None)

    @property
    def serving(self) -> "Serving":
        from .serving.feature import Serving

        return self.feature(Serving)

    @property
    def connected(self) -> bool:
        return bool(self.link is not None and self.link.connected.is_set())

    def _make_verifier(self) -> "CommandVerifier | None":
        sec = self.cfg.security
        if not sec.require_signed:
            return None
        from protocol.cmdauth import CommandVerifier
        from protocol.signing import SignatureError, load_public

        keys = []
        for path in sec.trusted_keys:
            try:
                keys.append(load_public(path))
            except SignatureError as exc:
                raise ConfigError(f"security.trusted_keys: {exc}") from None
        # replay protection survives restarts: the high-water marks live in the state dir
        from .core.replaymarks import MarksFile

        state = Path(self.cfg.state.dir)
        try:
            state.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state.dir {state}: {exc}") from None
        marks_file = MarksFile(state / "command-marks.json")
        marks, problem = marks_file.load()
        floor = None
        if problem:  # fail closed: nothing signed before this start is accepted
            log.error("replay marks: %s; refusing commands signed before now", problem)
            self.counters.reject("replay_marks_unreadable")
            floor = time.time()
        return CommandVerifier(keys, max_skew_s=sec.max_command_skew_s, marks=marks, persist=marks_file.save,
                               floor=floor)

    # -- composition -------------------------------------------------------
    def start(self) -> None:
        """Start every feature, then collect what each declares (idempotent)."""
        if self._started:
            return
        self._started = True
        for f in self.features:
            f.start()
        self.commands = {"ping": self._cmd_ping, "describe": self._cmd_describe,
                         "telemetry.now": self._cmd_telemetry_now}
        self.control_handlers = {"cmd": self._handle_cmd}
        self.request_handlers = {}
        own = {self.topics.cmd(self.device_id), self.topics.bin(self.device_id), self.topics.req(self.device_id),
               self.topics.group_cmd(self.cfg.device.group)}
        self.subscriptions = {}
        if self.cfg.homeassistant.enabled:
            birth = hass.birth_topic(self.cfg.homeassistant.prefix)
            self.subscriptions[birth] = Subscription(birth, 0, self._on_hass_birth)
        for f in self.features:
            for table, declared, what in ((self.commands, f.commands(), "command"),
                                          (self.control_handlers, f.control_kinds(), "control kind"),
                                          (self.request_handlers, f.request_kinds(), "request kind")):
                for key, handler in declared.items():
                    if key in table:
                        raise RuntimeError(f"{what} {key!r} declared twice ({type(f).__name__})")  # our bug
                    table[key] = handler
            for sub in f.subscriptions():
                if sub.topic in own or sub.topic in self.subscriptions:
                    raise RuntimeError(f"topic {sub.topic} subscribed twice ({type(f).__name__})")
                self.subscriptions[sub.topic] = sub

    # -- payload builders ------------------------------------------------
    def _envelope(self, kind: str, body: dict[str, Any], **kw: Any) -> Envelope:
        return Envelope(kind=kind, sender=self.device_id, body=body, **kw)

    def state_body(self, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status, "group": self.cfg.device.group}
        if self.cfg.device.site:   # the site it is behind (docs/sites.md); the will says it too
            body["site"] = self.cfg.device.site
        if status == "online":
            body["versions"] = {"agent": __version__, "protocol": env_mod.SCHEMA_VERSION}
            body["capabilities"] = sysinfo.capabilities(self.runtimes)
            if self.cfg.device.location:
                body["location"] = self.cfg.device.location
            for f in self.features:
                body.update(f.state_fields())
        return body

    def telemetry_body(self) -> dict[str, Any]:
        self.seq += 1
        body: dict[str, Any] = {"seq": self.seq, "interval_s": self.cfg.telemetry.interval_s}
        body.update(sysinfo.health(self.cfg.telemetry.disk_path, self.started))
        body.update(self.counters.snapshot())
        link = self.link
        if link is not None:
            body["link"] = {"connects": link.connects, "disconnects": link.disconnects,
                            "mqtt": "5" if link.is_v5 else "3.1.1",
                            "dropped_incoming": link.dropped_incoming, "refused": link.refused}
        body["outbox"] = self.outbox.stats()
        for f in self.features:
            try:
                section = f.telemetry()
            except Exception:  # noqa: BLE001 - a broken provider must not stop telemetry
                log.exception("telemetry of %s failed", type(f).__name__)
                self.counters.reject("telemetry_provider_error")
                continue
            if section is not None:
                body[f.name] = section
        return body

    # -- publishing (AgentContext) ---------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **props: Any) -> bool:
        link = self.link
        if link is None:
            return False
        ok = link.publish(topic, payload, qos, retain, **props)
        if ok:
            self.counters.sent(topic, len(payload))
        else:
            self.counters.reject("unsent_" + self.counters.topic_class(topic))
        return ok

    def publish_reliable(self, kind: str, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish now (QoS 1: paho re-sends what was in flight after a reconnect), or put it in the
        on-disk outbox and send it, in order, when the link is back. Nothing is lost silently."""
        if self.connected and not len(self.outbox) and not self._draining:
            if self.publish(topic, payload, qos, retain):
                return True
        try:
            self.outbox.put(kind, topic, payload, qos, retain)
        except OutboxFull as exc:
            self.counters.reject("outbox_full")
            log.error("could not keep a %s for later: %s", kind, exc)
            return False
        self._drain_soon()
        return False

    def _drain_soon(self) -> None:
        if self.connected and (self._drain_task is None or self._drain_task.done()):
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        """Send what waited, oldest first, while the link is up; each item leaves the outbox on PUBACK."""
        link = self.link
        self._draining = True
        try:
            while link is not None and link.connected.is_set():
                batch = self.outbox.peek(50)
                if not batch:
                    return
                for item in batch:
                    if not await link.publish_and_wait(item.topic, item.payload, max(1, item.qos), item.retain,
                                                       timeout=5.0):
                        return
                    self.counters.sent(item.topic, len(item.payload))
                    self.outbox.ack([item.id])
        finally:
            self._draining = False

    def emit_event(self, event: str, level: str = "info", **data: Any) -> bool:
        body = {"event": event, "level": level, **data}
        return self.publish_reliable("event", self.topics.events(self.device_id),
                                     encode(self._envelope("event", body)), qos=1)

    def publish_telemetry(self) -> bool:
        env = self._envelope("telemetry", self.telemetry_body())
        return self.publish_reliable("telemetry", self.topics.telemetry(self.device_id), encode(env), qos=1)

    def reply(self, request: Envelope, msg: Message | None, body: dict[str, Any]) -> bool:
        """Reply inside our own subtree: the requester's reply_to if it is ours, else the default."""
        topic = self.topics.reply(self.device_id)
        reply_to = request.reply_to or (msg.response_topic if msg else None)
        if reply_to:
            if self.topics.is_own_reply(self.device_id, reply_to):
                topic = reply_to
            else:
                self.counters.reject("reply_to_outside_subtree")
                body = {"ok": False, "error": f"reply_to {reply_to!r} is outside {topic}/..."}
        corr = request.corr or (msg.correlation.decode("utf-8", "replace") if msg and msg.correlation else None)
        env = Envelope(kind="reply", sender=self.device_id, body=body, corr=corr or request.id)
        return self.publish(topic, encode(env), qos=1,
                            correlation=msg.correlation if msg and msg.correlation else None)

    def republish_state(self) -> None:
        state = encode(self._envelope("state", self.state_body("online")))
        self.publish(self.topics.state(self.device_id), state, qos=1, retain=True)

    # -- connection hooks ------------------------------------------------
    async def _on_connect(self) -> None:
        self.republish_state()
        if self.cfg.homeassistant.enabled:
            self.announce_discovery()
        self.emit_event("connected", mqtt="5" if self.link and self.link.is_v5 else "3.1.1")
        if self.notifier is not None:
            model = (self.state_body("online").get("model") or {}).get("version", "none")
            self.notifier.status(f"connected to {self.cfg.mqtt.broker}; model {model}")
        ready, self._ready = getattr(self, "_ready", None), None
        if ready:
            ready()
        self._telemetry_now.set()
        self._drain_soon()
        for f in self.features:
            try:
                await f.on_connect()
            except Exception:  # noqa: BLE001 - one feature's bug must not stop the others
                log.exception("on_connect of %s failed", type(f).__name__)

    def announce_discovery(self) -> None:
        """HA discovery as a lifecycle: announce what the board and its features offer now, and
        clear (empty retained config: HA removes the entity) what was announced before and is gone."""
        if not self.cfg.homeassistant.enabled:
            return
        msgs = hass.discovery_messages(self.topics, self.device_id, self.cfg.homeassistant.prefix, __version__,
                                       area=self.cfg.device.location)
        for f in self.features:   # sub-devices (sensor MCUs) announce through the board
            msgs += f.discovery()
        for topic, payload in msgs:
            self.publish(topic, payload, qos=1, retain=True)
        if not self.connected:
            return   # nothing went out: keep the record as it was
        for topic in self._announced.replace(t for t, _ in msgs):
            log.info("Home Assistant: removing %s (no longer offered)", topic)
            self.publish(topic, b"", qos=1, retain=True)

    async def _on_hass_birth(self, msg: Message) -> None:
        if msg.payload.strip() == b"online":
            log.info("Home Assistant (re)started: re-announcing discovery")
            self.announce_discovery()

    # -- main ------------------------------------------------------------
    def _make_link(self) -> MqttLink:
        def will() -> Will:
            # the broker publishes this when the connection drops; its ts is when that connection
            # began (the agent cannot know when it will be lost), and the body says it is a will
            body = {**self.state_body("offline"), "reason": "connection lost", "last_will": True}
            return Will(self.topics.state(self.device_id), encode(self._envelope("state", body)), 1, True)

        subs = [(self.topics.cmd(self.device_id), 1), (self.topics.bin(self.device_id), 1),
                (self.topics.req(self.device_id), 1),
                (self.topics.group_cmd(self.cfg.device.group), 1)]
        subs += [(s.topic, s.qos) for s in self.subscriptions.values()]
        return MqttLink.from_settings(self.cfg.mqtt, self.device_id, subscriptions=subs,
                                      will=will,
                                      on_connect=self._on_connect, on_disconnect=self._on_disconnect,
                                      on_connect_error=self._on_connect_error)

    def _on_connect_error(self, reason: str) -> None:
        if self.notifier is not None:
            self.notifier.status(f"connecting to {self.cfg.mqtt.broker} ({reason}); {len(self.outbox)} kept on disk")

    def _on_disconnect(self, reason: str) -> None:
        self.emit_event("link.lost", "warning", reason=reason)  # waits in the outbox, arrives on reconnect
        if self.notifier is not None:
            self.notifier.status(f"broker unreachable ({reason}); {len(self.outbox)} messages kept on disk")

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        self.start()
        self.link = self._make_link()
        await self.link.start()
        tasks = [asyncio.create_task(self._telemetry_loop(), name="telemetry"),
                 asyncio.create_task(self._message_loop(), name="messages")]
        for f in self.features:
            tasks += [asyncio.create_task(coro(), name=name) for name, coro in f.tasks()]
        self._ready = ready   # told on the first connection (_on_connect), not before
        try:
            await stop.wait()
        finally:
            self._stopping = True
            await self.shutdown(tasks)

    async def shutdown(self, tasks: list[asyncio.Task], timeout: float = 1.2) -> None:
        link = self.link
        if link is not None and link.connected.is_set():
            offline = encode(self._envelope("state", self.state_body("offline")))
            await link.publish_and_wait(self.topics.state(self.device_id), offline, 1, True, timeout)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if link is not None:
            await link.stop()
        self.outbox.close()

    async def _telemetry_loop(self) -> None:
        interval = self.cfg.telemetry.interval_s
        while True:
            try:
                await asyncio.wait_for(self._telemetry_now.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self._telemetry_now.clear()
            self.publish_telemetry()  # offline samples wait in the outbox

    async def _message_loop(self) -> None:
        assert self.link is not None
        q = self.link.messages
        while True:
            msg = await q.get()
            try:
                await self.handle_message(msg)
            except Exception:  # noqa: BLE001 - our bug; count it and keep serving
                log.exception("internal error handling a message on %s", msg.topic)
                self.counters.reject("internal_error")

    # -- routing -----------------------------------------------------------
    def _wildcard_sub(self, topic: str) -> Subscription | None:
        """A feature's subscription with ``+``/``#`` (e.g. every offload worker's status)."""
        parts = topic.split("/")
        for flt, sub in self.subscriptions.items():
            if ("+" in flt or "#" in flt) and _topic_matches(flt.split("/"), parts):
                return sub
        return None

    async def handle_message(self, msg: Message) -> None:
        """Route one inbound message: a feature's own topic, the controller channel or the request topic."""
        self.counters.received(msg.topic, len(msg.payload))
        sub = self.subscriptions.get(msg.topic) or self._wildcard_sub(msg.topic)
        if sub is not None:
            await sub.handler(msg)
            return
        # the controller channel: JSON commands on cmd, signed binary frames on bin (frames that
        # still arrive on cmd, from a controller before the bin topic, are accepted the same way)
        control = msg.topic in (self.topics.cmd(self.device_id), self.topics.bin(self.device_id),
                                self.topics.group_cmd(self.cfg.device.group))
        decoded = self.decode(msg, request=not control)
        if decoded is None:
            return
        env, frame = decoded
        table = self.control_handlers if control else self.request_handlers
        handler = table.get(env.kind)
        if handler is None:
            self.counters.reject("kind_topic_mismatch" if env.kind in {**self.control_handlers, **self.request_handlers}
                                 else "unexpected_kind")
            log.warning("rejected %s message on %s: not served on this topic", env.kind, msg.topic)
            if env.reply_to or msg.response_topic:
                self.reply(env, msg, {"ok": False, "reason": "unsupported_kind",
                                      "error": f"kind {env.kind!r} is not served on {msg.topic}"})
            return
        if control and self.verifier is not None and not self._authenticated(env, frame, msg):
            return
        if not control:
            # requests may wait (an offload round trip): run them beside the loop, bounded
            if len(self._inflight) >= self.max_inflight_requests:
                self.counters.reject("overloaded")
                if env.reply_to or msg.response_topic:
                    self.reply(env, msg, {"ok": False, "reason": "overloaded",
                                          "error": "device overloaded: too many requests in flight"})
                return
            t = asyncio.ensure_future(self._guarded(handler(frame if frame is not None else env, msg), env, msg))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)
            return
        await handler(frame if frame is not None else env, msg)

    def decode(self, msg: Message, request: bool = False) -> "tuple[Envelope, Frame | None] | None":
        """The envelope (and frame) of a message, or None after counting, logging why not and
        replying with the reason when the sender can be told (``salvage_reply``). Binary frames
        on the request topic are held to ``[inference] max_request_bytes``."""
        frame_limit = self.cfg.mqtt.max_frame_bytes
        if request:
            frame_limit = min(frame_limit, self.cfg.inference.max_request_bytes)
        try:
            if is_frame(msg.payload):
                frame = decode_frame(msg.payload, max_bytes=frame_limit)
                return frame.envelope, frame
            return env_mod.decode(msg.payload, max_bytes=self.cfg.mqtt.max_message_bytes), None
        except DecodeError as exc:
            self.counters.reject(exc.reason)
            log.warning("rejected message on %s: %s", msg.topic, exc)
            target = salvage_reply(msg)
            if target is not None:
                reason = "oversize" if exc.reason == "oversize" else "bad_request"
                error = str(exc)
                if reason == "oversize" and not is_frame(msg.payload):
                    error += "; send tensors as a binary frame (docs/protocol.md; fleetctl infer --npy/--image does)"
                self.reply(target, msg, {"ok": False, "reason": reason, "error": error})
            return None

    async def _guarded(self, coro: Any, env: Envelope, msg: Message) -> None:
        try:
            await coro
        except Exception as exc:  # noqa: BLE001 - our bug; count it, tell the requester, keep serving
            log.exception("internal error handling a request on %s", msg.topic)
            self.counters.reject("internal_error")
            if env.reply_to or msg.response_topic:
                self.reply(env, msg, {"ok": False, "reason": "internal",
                                      "error": f"internal error: {type(exc).__name__}"})

    def _authenticated(self, env: Envelope, frame: "Frame | None", msg: Message) -> bool:
        from protocol.cmdauth import ReplayError, verify_frame
        from protocol.signing import SignatureError

        assert self.verifier is not None
        try:
            if frame is not None:
                # a chunk replayed after a restart is harmless (hash-checked, deduplicated): no fsync per chunk
                verify_frame(self.verifier, frame, msg.topic, time.time(), durable=env.kind not in HARMLESS_REPLAYS)
            else:
                read_only = env.kind == "cmd" and env.body.get("command") in READ_ONLY_COMMANDS
                self.verifier.verify(env, msg.topic, time.time(), durable=not read_only)
            return True
        except SignatureError as exc:
            what = env.body.get("command", env.kind) if env.kind == "cmd" else env.kind
            self.counters.reject("unauthenticated")
            if isinstance(exc, ReplayError):
                self.counters.reject("replayed_command")
            log.warning("refused %r on %s: %s", what, msg.topic, exc)
            self.emit_event("command.refused", "warning", command=what, reason=str(exc))
            if env.kind == "cmd":
                self.reply(env, msg, {"ok": False, "command": what, "error": f"refused: {exc}"})
            return False

    async def _handle_cmd(self, env: Envelope, msg: Message) -> None:
        name = env.body["command"]
        args = env.body.get("args") or {}
        handler = self.commands.get(name)
        if handler is None:
            self.counters.reject("unknown_command")
            log.warning("unknown command %r from %s", name, env.sender)
            self.reply(env, msg, {"ok": False, "command": name,
                                  "error": f"unknown command {name!r}; known: {', '.join(sorted(self.commands))}"})
            return
        try:
            result = handler(args, env)
            if inspect.isawaitable(result):
                result = await result
        except CommandError as exc:
            self.counters.reject("command_failed")
            self.reply(env, msg, {"ok": False, "command": name, "error": str(exc)})
            return
        self.counters.events["cmd_" + name] += 1
        self.reply(env, msg, {"ok": True, "command": name, "result": result})

    # -- built-in commands -----------------------------------------------
    def _cmd_ping(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        return {"pong": True, "agent_uptime_s": round(time.monotonic() - self.started, 3)}

    def _cmd_describe(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        return {"state": self.state_body("online"), "commands": sorted(self.commands),
                "config_source": self.cfg.source}

    def _cmd_telemetry_now(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        self._telemetry_now.set()
        return {"scheduled": True}


def _topic_matches(flt: list[str], parts: list[str]) -> bool:
    for i, f in enumerate(flt):
        if f == "#":
            return True
        if i >= len(parts) or f not in ("+", parts[i]):
            return False
    return len(flt) == len(parts)
