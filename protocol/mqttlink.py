"""The one MQTT edge both sides use: paho-mqtt handed to an asyncio loop.

This is the only module in ``protocol`` that touches the network, and nothing in the
pure modules imports it. Paho's types stop here: callers see ``Message`` and plain
``publish``/``subscribe`` calls.

Shape (aiomqtt-like, kept small):
* paho's network thread does socket I/O and hands every callback to the asyncio loop
  with ``call_soon_threadsafe``; all our state lives on the loop thread.
* reconnects with exponential backoff whose first step is jittered (``on_disconnect``
  re-seeds paho's delay), so a fleet does not stampede a restarted broker.
* ``protocol="auto"`` tries MQTT 5 and falls back to 3.1.1 when the broker says
  "unsupported protocol version" (amqtt, old brokers). MQTT 5 response-topic /
  correlation-data are used only when the session is v5; the envelope carries
  ``reply_to``/``corr`` either way.
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
import logging
import random
import ssl
import threading
from typing import Awaitable, Callable
from urllib.parse import urlsplit, unquote

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

log = logging.getLogger(__name__)

PROTOCOLS = ("auto", "5", "3.1.1")


class BrokerUrlError(ValueError):
    pass


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...``; clear error otherwise."""
    if not isinstance(url, str) or "://" not in url:
        raise BrokerUrlError(f"broker URL {url!r} must look like mqtt://host:port")
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise BrokerUrlError(f"broker URL scheme {parts.scheme!r} is not mqtt:// or mqtts://")
    tls = parts.scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise BrokerUrlError(f"broker URL {url!r} has no host")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise BrokerUrlError(f"broker URL {url!r} has an invalid port") from None
    if parts.path not in ("", "/"):
        raise BrokerUrlError(f"broker URL {url!r} must not have a path")
    return BrokerAddress(parts.hostname, port, tls,
                         unquote(parts.username) if parts.username else None,
                         unquote(parts.password) if parts.password else None)


@dataclass(frozen=True)
class TlsFiles:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    response_topic: str | None = None
    correlation: bytes | None = None
    #: the packet id, for ``MqttLink.ack`` on a link with ``manual_ack`` (0 for QoS 0)
    mid: int = 0
    #: MQTT 5 content type as the publisher set it (None on 3.1.1 or when unset)
    content_type: str | None = None


class _HandOff(asyncio.Queue):
    """The paho thread → loop hand-off. Its bound is a semaphore the *paho thread* waits on: when
    the consumer falls behind, the network thread stops reading (TCP pushes back to the broker)
    instead of accepting a message and dropping it. Each item taken frees a slot."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.slots = threading.Semaphore(slots)
        self.capacity = slots

    def _get(self):  # asyncio.Queue's subclass hook, behind get() and get_nowait()
        item = super()._get()
        self.slots.release()
        return item


@dataclass(frozen=True)
class MqttSettings:
    """The ``[mqtt]`` config section, shared by agent and controller configs."""

    broker: str = "mqtt://127.0.0.1:1883"
    protocol: str = "auto"
    keepalive: int = 30
    topic_root: str = "edgefleet"
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    min_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_message_bytes: int = 256 * 1024      # JSON messages
    max_frame_bytes: int = 8 * 1024 * 1024   # binary frames (tensors, chunks)

    def __post_init__(self) -> None:
        from .config_loader import ConfigError, check, one_of
        from .topics import InvalidId, validate_root

        try:
            parse_broker_url(self.broker)
        except BrokerUrlError as exc:
            raise ConfigError(f"mqtt.broker: {exc}") from None
        one_of(self.protocol, PROTOCOLS, "mqtt.protocol")
        check(5 <= self.keepalive <= 3600, "mqtt.keepalive", f"must be 5..3600 s, got {self.keepalive}")
        try:
            validate_root(self.topic_root)
        except InvalidId as exc:
            raise ConfigError(f"mqtt.topic_root: {exc}") from None
        check(0 < self.min_backoff_s <= self.max_backoff_s, "mqtt.min_backoff_s",
              "must be > 0 and <= mqtt.max_backoff_s")
        check(1024 <= self.max_message_bytes <= 64 * 1024 * 1024, "mqtt.max_message_bytes",
              f"must be 1 KiB..64 MiB, got {self.max_message_bytes}")
        check(1024 <= self.max_frame_bytes <= 256 * 1024 * 1024, "mqtt.max_frame_bytes",
              f"must be 1 KiB..256 MiB, got {self.max_frame_bytes}")
        check(not (self.cert_file or self.key_file) or bool(self.ca_file), "mqtt.ca_file",
              "is required when cert_file/key_file are set")

    def address(self) -> BrokerAddress:
        """Broker address with credentials; reads ``password_file`` (clear error if unreadable)."""
        from .config_loader import ConfigError

        addr = parse_broker_url(self.broker)
        if not self.username:
            return addr
        password = None
        if self.password_file:
            try:
                with open(self.password_file, encoding="utf-8") as fh:
                    password = fh.read().strip()
            except OSError as exc:
                raise ConfigError(f"mqtt.password_file {self.password_file}: {exc.strerror}") from None
        return BrokerAddress(addr.host, addr.port, addr.tls, self.username, password)

    def tls_files(self) -> TlsFiles | None:
        return TlsFiles(self.ca_file or None, self.cert_file or None, self.key_file or None) if self.ca_file else None



# MQTT 5 content types of what we publish (docs/protocol.md): JSON envelopes are UTF-8 text
# (payload format indicator 1); binary frames (protocol/binary.py, magic b"EF") are not.
CONTENT_JSON = "application/json"
CONTENT_FRAME = "application/vnd.edgefleet.frame"


def content_kind(payload: bytes | bytearray | memoryview) -> str:
    """"frame" for a binary frame, "json" for an envelope, "other" for anything else (HA's b"online")."""
    head = bytes(payload[:2])
    if head == b"EF":
        return "frame"
    if head[:1] in (b"{", b"["):
        return "json"
    return "other"


def _content_props(kind: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if kind == "json":
        props.ContentType = CONTENT_JSON
        props.PayloadFormatIndicator = 1
    elif kind == "frame":
        props.ContentType = CONTENT_FRAME
        props.PayloadFormatIndicator = 0
    return props


_CONTENT_PROPS = {k: _content_props(k) for k in ("json", "frame")}
_CONTENT_PROPS["other"] = None  # type: ignore[assignment]


class MqttLink:
    """One MQTT session, reconnecting forever until ``stop()``."""

    def __init__(self, client_id: str, broker: BrokerAddress, *, protocol: str = "auto",
                 keepalive: int = 30, will: "Will | Callable[[], Will] | None" = None, tls: TlsFiles | None = None,
                 subscriptions: list[tuple[str, int]] | None = None,
                 on_connect: Callable[[], Awaitable[None] | None] | None = None,
                 min_backoff: float = 0.5, max_backoff: float = 30.0, queue_size: int = 10000,
                 persistent: bool = False, session_expiry_s: int = 7 * 86400,
                 on_disconnect: Callable[[str], None] | None = None, manual_ack: bool = False) -> None:
        """``persistent``: keep the broker session (subscriptions + queued QoS 1 messages) across
        disconnects and restarts, so nothing sent to us while we were away is lost.

        Inbound flow control: at most ``queue_size`` messages wait for the consumer; past that the
        network thread waits (the broker holds the rest) — nothing the broker handed us is dropped.
        ``manual_ack``: a QoS 1 message is acknowledged only when the consumer calls ``ack(msg)``
        (after it stored it): a crash before that and the broker delivers it again."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
        self.client_id = client_id
        self.broker = broker
        self.protocol = protocol
        self.keepalive = keepalive
        self.will = will
        self.tls = tls
        self.subscriptions = list(subscriptions or [])
        self.on_connect = on_connect
        self.persistent = persistent
        self.session_expiry_s = session_expiry_s
        self.on_disconnect = on_disconnect
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.manual_ack = manual_ack
        self.messages: asyncio.Queue[Message] = _HandOff(queue_size)
        #: paho thread -> loop: messages appended there, moved into ``messages`` by one posted drain
        self._inbox: deque[Message] = deque()
        self._inbox_wake = False
        self.connected = asyncio.Event()
        self.dropped_incoming = 0
        self.connects = 0
        self.disconnects = 0
        self.last_error: str | None = None
        self.connack_timeout = 3.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._v5 = protocol != "3.1.1"
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        #: mid -> future resolved by the broker's PUBACK (aiomqtt's _pending_publishes)
        self._pending: dict[int, asyncio.Future] = {}

    @classmethod
    def from_settings(cls, settings: MqttSettings, client_id: str, **kw: object) -> "MqttLink":
        return cls(client_id, settings.address(), protocol=settings.protocol, keepalive=settings.keepalive,
                   tls=settings.tls_files(), min_backoff=settings.min_backoff_s,
                   max_backoff=settings.max_backoff_s, **kw)  # type: ignore[arg-type]

    # -- lifecycle -------------------------------------------------------
    @property
    def is_v5(self) -> bool:
        return self._v5 and self.connected.is_set()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._start_client()

    def _start_client(self) -> None:
        proto = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
                        clean_session=None if self._v5 else not self.persistent, manual_ack=self.manual_ack)
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls or (self.tls and self.tls.ca_file):
            t = self.tls or TlsFiles()
            c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                      cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if callable(self.will):
            # a will built afresh before every (re)connect: its timestamp is when the connection it
            # guards began, not when the process started (paho calls on_pre_connect each attempt)
            def _arm(client, userdata, make=self.will) -> None:
                w = make()
                client.will_set(w.topic, w.payload, w.qos, w.retain)
            _arm(c, None)
            c.on_pre_connect = _arm
        elif self.will:
            c.will_set(self.will.topic, self.will.payload, self.will.qos, self.will.retain)
        c.reconnect_delay_set(self._jittered_min(), int(max(1, self.max_backoff)))
        c.max_queued_messages_set(10000)
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        c.on_socket_open = self._cb_socket_open
        self._client = c
        if self._v5:
            props = None
            if self.persistent:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry_s
            c.connect_async(self.broker.host, self.broker.port, self.keepalive,
                            clean_start=not self.persistent, properties=props)
        else:
            c.connect_async(self.broker.host, self.broker.port, self.keepalive)
        c.loop_start()

    def _jittered_min(self) -> float:
        return self.min_backoff * random.uniform(0.5, 1.5)

    async def stop(self, timeout: float = 1.0) -> None:
        """Clean disconnect (no last will is sent) and stop the network thread."""
        self._stopping = True
        c = self._client
        if c is None:
            return
        try:
            c.disconnect()
        except Exception:  # noqa: BLE001 - already gone is fine
            pass
        await asyncio.get_running_loop().run_in_executor(None, c.loop_stop)
        self.connected.clear()
        self._fail_pending()
        for t in list(self._tasks):
            t.cancel()

    def _fail_pending(self) -> None:
        """Publishes of a client that is gone will never be acknowledged: they were not sent."""
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_result(False)

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self.connected.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    # -- paho thread → loop ---------------------------------------------
    def _post(self, fn: Callable, *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closing during shutdown
                pass

    def _cb_connect(self, client, userdata, flags, rc, props=None) -> None:
        self._post(self._on_connect, client, rc.value if hasattr(rc, "value") else int(rc), str(rc))

    def _cb_socket_open(self, client, userdata, sock) -> None:
        if self.protocol == "auto" and self._v5 and self.connects == 0:
            self._post(self._arm_connack_timer, client)

    def _arm_connack_timer(self, client: mqtt.Client) -> None:
        # amqtt (3.1.1 only) silently ignores an MQTT 5 CONNECT that carries a will:
        # no CONNACK, no close. Treat "TCP up but no CONNACK" as "speaks 3.1.1 only".
        if self._loop is not None:
            self._loop.call_later(self.connack_timeout, self._maybe_fallback, client, "no CONNACK")

    def _cb_disconnect(self, client, userdata, flags, rc, props=None) -> None:
        # Some 3.1.1-only brokers (amqtt with a will) drop a v5 CONNECT without a CONNACK.
        self._post(self._maybe_fallback, client, str(rc))
        try:
            client.reconnect_delay_set(self._jittered_min(), int(max(1, self.max_backoff)))
        except Exception:  # noqa: BLE001
            pass
        self._post(self._on_disconnect, client, str(rc))

    def _cb_message(self, client, userdata, m) -> None:
        rt = corr = ctype = None
        props = getattr(m, "properties", None)
        if props is not None:
            rt = getattr(props, "ResponseTopic", None)
            corr = getattr(props, "CorrelationData", None)
            ctype = getattr(props, "ContentType", None)
        msg = Message(m.topic, bytes(m.payload), m.qos, bool(m.retain), rt, corr, m.mid if m.qos else 0, ctype)
        slots = self.messages.slots  # type: ignore[attr-defined]
        while not slots.acquire(timeout=0.5):   # the consumer is behind: stop reading until it catches up
            if self._stopping or self._loop is None or self._loop.is_closed():
                self.dropped_incoming += 1      # shutting down: never acknowledged with manual_ack
                log.warning("shutting down with a full inbound queue: %s not taken", m.topic)
                return
        self._inbox.append(msg)
        if not self._inbox_wake:                 # one loop wake-up per burst, not one per message
            self._inbox_wake = True
            self._post(self._drain_inbox)

    def _cb_publish(self, client, userdata, mid, rc=None, props=None) -> None:
        # posted to the loop: the future for this mid is registered before the loop runs this
        self._post(self._on_published, client, mid)

    # -- loop thread -----------------------------------------------------
    def _on_published(self, client: mqtt.Client, mid: int) -> None:
        if client is not self._client:
            return
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(True)

    def _drain_inbox(self) -> None:
        # reset before draining: a message the paho thread appends after this either is drained
        # below or sees the flag down and posts another drain
        self._inbox_wake = False
        inbox, put = self._inbox, self.messages.put_nowait
        while inbox:
            put(inbox.popleft())        # unbounded put: the slot was taken in the paho thread

    def ack(self, msg: Message) -> None:
        """With ``manual_ack``: acknowledge a QoS 1 message the consumer has stored."""
        c = self._client
        if self.manual_ack and msg.qos and msg.mid and c is not None:
            c.ack(msg.mid, msg.qos)

    def _on_connect(self, client: mqtt.Client, rc: int, reason: str) -> None:
        if client is not self._client or self._stopping:
            return
        if rc != 0:
            self.last_error = reason
            if self.protocol == "auto" and self._v5 and rc in (1, 0x84):
                log.info("broker %s does not speak MQTT 5 (%s); falling back to 3.1.1", self.broker.url, reason)
                self._v5 = False
                self._client = None
                self._spawn(self._restart(client))
            else:
                log.warning("MQTT connect to %s refused: %s", self.broker.url, reason)
            return
        self.connects += 1
        self.last_error = None
        for flt, qos in self.subscriptions:
            client.subscribe(flt, qos)
        self.connected.set()
        log.info("connected to %s as %s (MQTT %s)", self.broker.url, self.client_id, "5" if self._v5 else "3.1.1")
        if self.on_connect:
            res = self.on_connect()
            if asyncio.iscoroutine(res):
                self._spawn(res)

    def _maybe_fallback(self, client: mqtt.Client, reason: str) -> None:
        if (client is self._client and self.protocol == "auto" and self._v5 and self.connects == 0
                and not self._stopping and not self.connected.is_set()):
            log.info("broker %s did not accept an MQTT 5 connect (%s); falling back to 3.1.1", self.broker.url, reason)
            self._v5 = False
            self._client = None
            self._spawn(self._restart(client))

    async def _restart(self, old: mqtt.Client) -> None:
        self._fail_pending()
        try:
            old.disconnect()
        except Exception:  # noqa: BLE001
            pass
        await asyncio.get_running_loop().run_in_executor(None, old.loop_stop)
        if not self._stopping:
            self._start_client()

    def _on_disconnect(self, client: mqtt.Client, reason: str) -> None:
        if client is not self._client:
            return
        was = self.connected.is_set()
        self.connected.clear()
        if was:
            self.disconnects += 1
            if not self._stopping:
                log.warning("disconnected from %s: %s", self.broker.url, reason)
                if self.on_disconnect:
                    self.on_disconnect(reason)

    def _spawn(self, coro: Awaitable) -> None:
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    # -- API used from the loop thread ----------------------------------
    def subscribe(self, flt: str, qos: int = 1) -> None:
        """Subscribe now and on every reconnect."""
        if (flt, qos) not in self.subscriptions:
            self.subscriptions.append((flt, qos))
        if self._client is not None and self.connected.is_set():
            self._client.subscribe(flt, qos)

    def _props(self, response_topic: str | None, correlation: bytes | None,
               payload: bytes = b"") -> Properties | None:
        """MQTT 5 properties (None on 3.1.1, where the envelope carries what matters): the content
        type, so a dashboard can tell JSON from a binary frame before parsing, and request/response."""
        if not self._v5:
            return None
        kind = content_kind(payload)
        if not (response_topic or correlation):
            return _CONTENT_PROPS[kind]   # shared, never mutated: no allocation per message
        props = _content_props(kind)
        if response_topic:
            props.ResponseTopic = response_topic
        if correlation:
            props.CorrelationData = correlation
        return props

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *,
                response_topic: str | None = None, correlation: bytes | None = None) -> bool:
        """Hand a message to paho. False if it could not be accepted (not connected)."""
        c = self._client
        if c is None or not self.connected.is_set():
            return False
        props = self._props(response_topic, correlation, payload)
        info = c.publish(topic, payload, qos, retain, properties=props)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def publish_acked(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, *,
                      response_topic: str | None = None, correlation: bytes | None = None) -> "asyncio.Future[bool]":
        """Publish at QoS >= 1; the future resolves True when the broker acknowledged it (PUBACK),
        False at once if paho could not take it. It stays pending across a reconnect (paho re-sends
        what was in flight) — "sent" in a store means this future resolved True."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        c = self._client
        if c is None or not self.connected.is_set():
            fut.set_result(False)
            return fut
        props = self._props(response_topic, correlation, payload)
        info = c.publish(topic, payload, max(1, qos), retain, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            fut.set_result(False)
            return fut
        self._pending[info.mid] = fut
        fut.add_done_callback(lambda f, mid=info.mid: self._pending.pop(mid, None) if f.cancelled() else None)
        return fut

    async def publish_and_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                               timeout: float = 1.0) -> bool:
        """Publish and wait until the broker acknowledged it (QoS 1) or ``timeout``."""
        fut = self.publish_acked(topic, payload, qos, retain)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return False
