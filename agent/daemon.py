"""The edge-agent daemon: wiring between the MQTT edge and the agent's parts.

Lifecycle (uvicorn's shape): the CLI captures signals and loads config → ``Agent.run``
connects, announces itself (retained state, HA discovery), publishes telemetry on an
interval and serves commands/requests → on stop it publishes ``offline``, flushes
and returns. Every inbound message goes through ``protocol.envelope.decode``; a bad
one is logged with its reason, counted, and the loop goes on.
"""
from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
import sqlite3
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from protocol import envelope as env_mod
from protocol.binary import Frame, decode_frame, is_frame
from protocol.envelope import DecodeError, Envelope, encode
from protocol.mqttlink import Message, MqttLink, Will
from protocol.topics import Topics

from . import __version__, hass, sysinfo
from .config import AgentConfig, ConfigError
from .counters import Counters

log = logging.getLogger("edge_agent")

if TYPE_CHECKING:  # pragma: no cover
    from protocol.cmdauth import CommandVerifier

CommandHandler = Callable[[dict[str, Any], Envelope], "Awaitable[dict[str, Any]] | dict[str, Any]"]


class CommandError(Exception):
    """A command that cannot be carried out; the message goes back in the reply."""


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.device_id = cfg.device.id
        self.topics = Topics(cfg.mqtt.topic_root)
        self.counters = Counters(self.topics, cfg.homeassistant.prefix)
        self.started = time.monotonic()
        self.seq = 0
        self.link: MqttLink | None = None
        self.commands: dict[str, CommandHandler] = {
            "ping": self._cmd_ping,
            "describe": self._cmd_describe,
            "telemetry.now": self._cmd_telemetry_now,
        }
        #: name → callable returning a JSON-able dict merged into telemetry under that name
        self.telemetry_providers: dict[str, Callable[[], dict[str, Any]]] = {}
        #: kind → handler for the controller channel (cmd and group cmd topics; signed when required)
        self.control_handlers: dict[str, Callable[[Any, Message], Awaitable[None]]] = {"cmd": self._handle_cmd}
        #: kind → handler for the request topic (inference requests from any authorised client)
        self.request_handlers: dict[str, Callable[[Any, Message], Awaitable[None]]] = {}
        #: callables returning more (topic, payload) HA discovery messages (sub-devices)
        self.hass_extra: list[Callable[[], list[tuple[str, bytes]]]] = []
        #: coroutines run on every (re)connect, after state and discovery are published
        self.connect_hooks: list[Callable[[], Awaitable[None]]] = []
        self._telemetry_now = asyncio.Event()
        self._stopping = False
        self.verifier = self._make_verifier()
        from .outbox import Outbox

        try:
            self.outbox = Outbox(Path(cfg.state.dir) / "outbox.db", cfg.state.outbox_bytes)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"state.dir {cfg.state.dir}: cannot open the outbox there: {exc}") from None
        self._draining = False
        self._inflight: set[asyncio.Future] = set()
        self.max_inflight_requests = 256
        self.notifier: Any = None  # systemd notifier (agent.sdnotify), set by the CLI
        from .runtimes import available_runtimes
        from .serving import Serving

        self.runtimes = available_runtimes()
        self.serving = Serving(self)
        self.request_handlers["infer.request"] = self.serving.handle_request
        self.telemetry_providers["model"] = self.serving.metrics
        from .adaptation import Adaptation
        from .offload import Offloader
        from .offload_policy import OffloadPolicy

        oc = cfg.offload
        self.offloader = Offloader(self, OffloadPolicy(enabled=oc.enabled, threshold=oc.threshold, mode=oc.mode,
                                                       deadline_ms=oc.deadline_ms, margin_ms=oc.margin_ms))
        self.telemetry_providers["offload"] = self.offloader.telemetry
        self.commands["offload.set"] = self._cmd_offload_set
        self.commands["offload.status"] = lambda a, e: self.offloader.telemetry()

        self.adaptation = Adaptation(self)
        self.commands["model.describe"] = self._cmd_model_describe
        self.commands["model.rollback"] = self._cmd_model_rollback
        from .updater import Updater

        self.updater = Updater(self)
        self._drain_task: asyncio.Future | None = None
        self.mcu: Any = None  # a sensor MCU on a serial port ([bridge]; agent.mcu)
        if cfg.bridge.enabled:
            from .mcu import McuBridge

            self.mcu = McuBridge(self)

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
        return CommandVerifier(keys, max_skew_s=sec.max_command_skew_s)

    # -- payload builders ------------------------------------------------
    def _envelope(self, kind: str, body: dict[str, Any], **kw: Any) -> Envelope:
        return Envelope(kind=kind, sender=self.device_id, body=body, **kw)

    def state_body(self, status: str) -> dict[str, Any]:
        body: dict[str, Any] = {"status": status, "group": self.cfg.device.group}
        if status == "online":
            body["versions"] = {"agent": __version__, "protocol": env_mod.SCHEMA_VERSION}
            body["capabilities"] = sysinfo.capabilities(self.runtimes)
            if self.cfg.device.location:
                body["location"] = self.cfg.device.location
            info = self.serving.model_info()
            if info:
                body["model"] = info
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
                            "dropped_incoming": link.dropped_incoming}
        body["outbox"] = self.outbox.stats()
        for name, provider in self.telemetry_providers.items():
            try:
                body[name] = provider()
            except Exception:  # noqa: BLE001 - a broken provider must not stop telemetry
                log.exception("telemetry provider %s failed", name)
                self.counters.reject("telemetry_provider_error")
        return body

    # -- publishing ------------------------------------------------------
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
        link = self.link
        if link is not None and link.connected.is_set() and not len(self.outbox) and not self._draining:
            if self.publish(topic, payload, qos, retain):
                return True
        from .outbox import OutboxFull

        try:
            self.outbox.put(kind, topic, payload, qos, retain)
        except OutboxFull as exc:
            self.counters.reject("outbox_full")
            log.error("could not keep a %s for later: %s", kind, exc)
            return False
        self._drain_soon()
        return False

    def _drain_soon(self) -> None:
        if self.link is not None and self.link.connected.is_set() and (self._drain_task is None or self._drain_task.done()):
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

    # -- connection hooks ------------------------------------------------
    async def _on_connect(self) -> None:
        state = encode(self._envelope("state", self.state_body("online")))
        self.publish(self.topics.state(self.device_id), state, qos=1, retain=True)
        if self.cfg.homeassistant.enabled:
            self.announce_hass()
        self.emit_event("connected", mqtt="5" if self.link and self.link.is_v5 else "3.1.1")
        if self.notifier is not None:
            self.notifier.status(f"connected to {self.cfg.mqtt.broker}; model "
                                 f"{(self.serving.model_info() or {}).get('version', 'none')}")
        self._telemetry_now.set()
        self._drain_soon()
        for hook in self.connect_hooks:
            try:
                await hook()
            except Exception:  # noqa: BLE001 - one feature's bug must not stop the others
                log.exception("connect hook %r failed", hook)

    def announce_hass(self) -> None:
        for topic, payload in hass.discovery_messages(self.topics, self.device_id,
                                                      self.cfg.homeassistant.prefix, __version__):
            self.publish(topic, payload, qos=1, retain=True)
        for extra in self.hass_extra:   # sub-devices (sensor MCUs) announce through the board
            for topic, payload in extra():
                self.publish(topic, payload, qos=1, retain=True)

    # -- main ------------------------------------------------------------
    def _make_link(self) -> MqttLink:
        offline = encode(self._envelope("state", self.state_body("offline")))
        subs = [(self.topics.cmd(self.device_id), 1), (self.topics.req(self.device_id), 1),
                (self.offloader.reply_topic, 1),
                (self.topics.group_cmd(self.cfg.device.group), 1)]
        if self.cfg.homeassistant.enabled:
            subs.append((hass.birth_topic(self.cfg.homeassistant.prefix), 0))
        return MqttLink.from_settings(self.cfg.mqtt, self.device_id, subscriptions=subs,
                                      will=Will(self.topics.state(self.device_id), offline, 1, True),
                                      on_connect=self._on_connect, on_disconnect=self._on_disconnect)

    def _on_disconnect(self, reason: str) -> None:
        self.emit_event("link.lost", "warning", reason=reason)  # waits in the outbox, arrives on reconnect
        if self.notifier is not None:
            self.notifier.status(f"broker unreachable ({reason}); {len(self.outbox)} messages kept on disk")

    async def run(self, stop: asyncio.Event, ready: Callable[[], None] | None = None) -> None:
        from .serving import make_source
        from .sources import SourceError

        self.serving.start()
        self.updater.restore()
        self.adaptation.start()
        try:
            source = make_source(self)
        except SourceError as exc:
            raise ConfigError(f"inference: {exc}") from None
        self.link = self._make_link()
        await self.link.start()
        tasks = [asyncio.create_task(self._telemetry_loop(), name="telemetry"),
                 asyncio.create_task(self._message_loop(), name="messages"),
                 asyncio.create_task(self.serving.summary_ticker(), name="results"),
                 asyncio.create_task(self.adaptation.run(), name="learning"),
                 asyncio.create_task(self.updater.run(), name="updates")]
        if source is not None:
            tasks.append(asyncio.create_task(self.serving.run_source(source), name="source"))
        if self.mcu is not None:
            tasks.append(asyncio.create_task(self.mcu.run(), name="mcu"))
        if ready:
            ready()
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

    async def handle_message(self, msg: Message) -> None:
        """Validate, authenticate (controller channel) and dispatch one inbound message."""
        self.counters.received(msg.topic, len(msg.payload))
        if self.cfg.homeassistant.enabled and msg.topic == hass.birth_topic(self.cfg.homeassistant.prefix):
            if msg.payload.strip() == b"online":
                log.info("Home Assistant (re)started: re-announcing discovery")
                self.announce_hass()
            return
        control = msg.topic in (self.topics.cmd(self.device_id), self.topics.group_cmd(self.cfg.device.group))
        frame: Frame | None = None
        try:
            if is_frame(msg.payload):
                frame = decode_frame(msg.payload, max_bytes=self.cfg.mqtt.max_frame_bytes)
                env = frame.envelope
            else:
                env = env_mod.decode(msg.payload, max_bytes=self.cfg.mqtt.max_message_bytes)
        except DecodeError as exc:
            self.counters.reject(exc.reason)
            log.warning("rejected message on %s: %s", msg.topic, exc)
            return
        if msg.topic == self.offloader.reply_topic:
            table = {"offload.reply": self.offloader.on_reply}
        else:
            table = self.control_handlers if control else self.request_handlers
        handler = table.get(env.kind)
        if handler is None:
            self.counters.reject("kind_topic_mismatch" if env.kind in {**self.control_handlers, **self.request_handlers}
                                 else "unexpected_kind")
            log.warning("rejected %s message on %s: not served on this topic", env.kind, msg.topic)
            if env.reply_to or msg.response_topic:
                self.reply(env, msg, {"ok": False, "error": f"kind {env.kind!r} is not served on {msg.topic}"})
            return
        if control and self.verifier is not None and not self._authenticated(env, frame, msg):
            return
        if table is self.request_handlers:
            # requests may wait (an offload round trip): run them beside the loop, bounded
            if len(self._inflight) >= self.max_inflight_requests:
                self.counters.reject("overloaded")
                if env.reply_to or msg.response_topic:
                    self.reply(env, msg, {"ok": False, "error": "device overloaded: too many requests in flight"})
                return
            t = asyncio.ensure_future(self._guarded(handler(env, msg), msg.topic))
            self._inflight.add(t)
            t.add_done_callback(self._inflight.discard)
            return
        await handler(frame if frame is not None else env, msg)

    async def _guarded(self, coro: Any, topic: str) -> None:
        try:
            await coro
        except Exception:  # noqa: BLE001 - our bug; count it and keep serving
            log.exception("internal error handling a request on %s", topic)
            self.counters.reject("internal_error")

    def _authenticated(self, env: Envelope, frame: "Frame | None", msg: Message) -> bool:
        from protocol.cmdauth import verify_frame
        from protocol.signing import SignatureError

        assert self.verifier is not None
        try:
            if frame is not None:
                verify_frame(self.verifier, frame, msg.topic, time.time())
            else:
                self.verifier.verify(env, msg.topic, time.time())
            return True
        except SignatureError as exc:
            what = env.body.get("command", env.kind) if env.kind == "cmd" else env.kind
            self.counters.reject("unauthenticated")
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

    def _cmd_offload_set(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        try:
            p = self.offloader.set_policy(**args)
        except (ValueError, TypeError) as exc:
            raise CommandError(f"bad offload policy: {exc}") from None
        self.emit_event("offload.policy", enabled=p.enabled, threshold=p.threshold, mode=p.mode,
                        deadline_ms=p.deadline_ms)
        return {"enabled": p.enabled, "threshold": p.threshold, "mode": p.mode, "deadline_ms": p.deadline_ms}

    def _cmd_model_describe(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        store = self.serving.store
        return {"serving": self.serving.model_info(), "store": store.describe() if store else None,
                "load_error": self.serving.load_error}

    def _cmd_model_rollback(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        store = self.serving.store
        if store is None:
            raise CommandError("no model store")
        target = None
        if args.get("bundle_sha256"):
            target = store.find_id(str(args["bundle_sha256"]))
            if target is None:
                raise CommandError(f"bundle {str(args['bundle_sha256'])[:12]} is not installed here")
        elif args.get("version"):
            target = store.find(str(args["version"]))
            if target is None:
                raise CommandError(f"version {args['version']!r} is not installed here")
        res = store.rollback(target)
        if not res.ok:
            raise CommandError(res.reason)
        self.serving.load_current()
        self.emit_event("model.rolled_back", "warning", version=res.version, reason="on command")
        self.republish_state()
        return {"version": res.version}

    def republish_state(self) -> None:
        state = encode(self._envelope("state", self.state_body("online")))
        self.publish(self.topics.state(self.device_id), state, qos=1, retain=True)

    def _cmd_telemetry_now(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        self._telemetry_now.set()
        return {"scheduled": True}


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))
