"""The one MQTT edge both sides use: paho-mqtt handed to an asyncio loop.

This is the only module in ``protocol`` that touches the network, and nothing in the
pure modules imports it. Paho's types stop here: callers see ``Message`` and plain
``publish``/``subscribe`` calls.

Shape (aiomqtt-like, kept small):
* paho's network I/O runs *inside* the asyncio loop (paho's external-loop API, as aiomqtt does):
  the socket is watched with ``add_reader``/``add_writer`` → ``loop_read``/``loop_write``, a
  once-a-second task runs ``loop_misc`` (keepalive). No network thread: a request/response
  crosses no thread and no self-pipe on either side (with a paho thread, every message cost two
  thread wake-ups per hop: ~1 ms each on a busy 2-core board). Only the blocking TCP/TLS connect
  runs in an executor; everything else, and all our state, lives on the loop thread.
* reconnects with exponential backoff whose every step is jittered, so a fleet does not
  stampede a restarted broker.
* ``protocol="auto"`` tries MQTT 5 and falls back to 3.1.1 when the broker says
  "unsupported protocol version" (amqtt, old brokers). MQTT 5 response-topic /
  correlation-data are used only when the session is v5; the envelope carries
  ``reply_to``/``corr`` either way.
"""
from __future__ import annotations

import asyncio
import logging
import random
import ssl
import sys
import threading
import time
from typing import Awaitable, Callable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from . import linkreport
# the plain parts live in mqttconf (no paho there); every name stays importable from here
from .mqttconf import (CONTENT_FRAME, CONTENT_JSON, PROTOCOLS, BrokerAddress, BrokerUrlError,  # noqa: F401
                       Message, MqttSettings, TlsFiles, Will, content_kind, parse_broker_url, set_nodelay,
                       tls_config_error)

log = logging.getLogger(__name__)


class _HandOff(asyncio.Queue):
    """The network → consumer hand-off, bounded: when the consumer falls behind, the link stops
    reading the socket (TCP pushes back to the broker) instead of accepting a message and dropping
    it. What paho already parsed past the bound waits in ``held`` (at most one read's worth) and
    moves in as items are taken; ``on_room`` resumes reading."""

    def __init__(self, slots: int) -> None:
        super().__init__()
        self.capacity = slots
        self.held: list = []
        self.on_room: Callable[[], None] | None = None

    def offer(self, item: object) -> bool:
        """Take ``item`` now or hold it; False when the consumer is behind (pause reading)."""
        if self.held or self.qsize() >= self.capacity:
            self.held.append(item)
            return False
        self.put_nowait(item)
        return True

    def _get(self):  # asyncio.Queue's subclass hook, behind get() and get_nowait()
        item = super()._get()
        if self.held:
            self._put(self.held.pop(0))    # keeps the order; the getter that woke us has its item
        if not self.held and self.on_room is not None and super().qsize() < self.capacity:
            self.on_room()
        return item


class _FastProperties(Properties):
    """paho's MQTT 5 ``Properties`` with its name scans replaced by dict look-ups.

    Stock paho builds two tables per instance and, for every attribute set or unpacked, scans its
    27 names calling ``str.replace`` on each (~100 µs to decode a request's four properties,
    ~30 µs for an empty PUBACK's — several times the rest of a request/response on a small board).
    Same tables (shared, read-only), same checks and errors (anything unusual goes to paho's own
    code), same wire format; paho's own ``unpack``/``pack``/``readProperty`` run unchanged on top.
    Installed as the class paho's decoder instantiates (``_install_fast_properties``)."""

    _TEMPLATE = Properties(PacketTypes.PUBLISH)
    types = _TEMPLATE.types
    names = _TEMPLATE.names
    properties = _TEMPLATE.properties
    _IDENT = {n.replace(" ", ""): i for n, i in names.items()}
    _NAME = {i: n for n, i in names.items()}
    _MULTI = frozenset(n for n, i in _IDENT.items() if i in (11, 38))
    #: the values paho range-checks (outside them, paho's own __setattr__ raises its error)
    _RANGES = {"ReceiveMaximum": (1, 65535), "TopicAlias": (1, 65535), "TopicAliasMaximum": (0, 65535),
               "MaximumPacketSize": (1, 268435455), "SubscriptionIdentifier": (1, 268435455),
               "RequestResponseInformation": (0, 1), "RequestProblemInformation": (0, 1),
               "PayloadFormatIndicator": (0, 1)}

    def __init__(self, packetType: int) -> None:  # noqa: N803 - paho's name
        object.__setattr__(self, "packetType", packetType)

    def getIdentFromName(self, compressedName: str) -> int:  # noqa: N802,N803
        return self._IDENT.get(compressedName.replace(" ", ""), -1)

    def getNameFromIdent(self, identifier: int) -> str | None:  # noqa: N802
        return self._NAME.get(identifier)

    def allowsMultiple(self, compressedName: str) -> bool:  # noqa: N802,N803
        return compressedName.replace(" ", "") in self._MULTI

    def __setattr__(self, name: str, value: object) -> None:
        name = name.replace(" ", "")
        ident = self._IDENT.get(name)
        bounds = self._RANGES.get(name)
        if (ident is None or name in self._MULTI or self.packetType not in self.properties[ident][1]
                or (bounds is not None and not (type(value) is int and bounds[0] <= value <= bounds[1]))):
            Properties.__setattr__(self, name, value)   # paho's checks and its error messages
        else:
            object.__setattr__(self, name, value)

    def clear(self) -> None:
        for name in [k for k in self.__dict__ if k in self._IDENT]:
            delattr(self, name)

    def isEmpty(self) -> bool:  # noqa: N802
        return not any(k in self._IDENT for k in self.__dict__)


def _install_fast_properties() -> bool:
    """Let paho's packet decoder (and its QoS 0 on_publish) build ``_FastProperties``. Only on the
    paho 2.x layout this was written against (``paho.mqtt._packet``); elsewhere paho stays as is."""
    try:
        from paho.mqtt import _packet
    except ImportError:
        return False
    if getattr(_packet, "Properties", None) is not Properties or getattr(mqtt, "Properties", None) is not Properties:
        return False
    _packet.Properties = _FastProperties    # type: ignore[attr-defined]
    mqtt.Properties = _FastProperties       # type: ignore[attr-defined,misc]
    return True


FAST_PROPERTIES = _install_fast_properties()


def _content_props(kind: str) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if kind == "json":
        props.ContentType = CONTENT_JSON
        props.PayloadFormatIndicator = 1
    elif kind == "frame":
        props.ContentType = CONTENT_FRAME
        props.PayloadFormatIndicator = 0
    return props




class _PackedProps(Properties):
    """PUBLISH properties whose wire form is computed once: paho's ``Properties`` validates every
    attribute by scanning its name table and packs by scanning it again (~40 µs a request/response
    publish on a small board). Built from a validated paho template (same tables, same attributes,
    so ``str()``/``json()`` still work); ``pack()`` returns the bytes paho's own ``writeProperty``
    wrote."""

    def pack(self) -> bytes:
        return self.__dict__["_packed"]


_BINARY = Properties(PacketTypes.PUBLISH).types.index("Binary Data")
_REPLY_PROPS: dict[tuple[str, str | None], tuple[Properties, bytes]] = {}


def _reply_props(kind: str, response_topic: str | None, correlation: bytes | None) -> Properties:
    """Content type + response topic + correlation data, packed without paho's per-message scans."""
    key = (kind, response_topic)
    hit = _REPLY_PROPS.get(key)
    if hit is None:
        tpl = _content_props(kind)          # validated by paho, once per (kind, response topic)
        if response_topic:
            tpl.ResponseTopic = response_topic
        if len(_REPLY_PROPS) >= 256:        # reply topics are few per link; a bound all the same
            _REPLY_PROPS.clear()
        hit = _REPLY_PROPS[key] = (tpl, _props_body(tpl))
    tpl, body = hit
    if not correlation:
        return _packed_props(tpl, body)
    return _packed_props(tpl, body + tpl.writeProperty(9, _BINARY, correlation), CorrelationData=correlation)


def _packed_props(tpl: Properties, body: bytes, **more: object) -> Properties:
    props = Properties.__new__(_PackedProps)
    d = props.__dict__
    d.update(tpl.__dict__)                  # packetType, the shared name/type tables, the attributes
    d.update(more)
    d["_packed"] = VariableByteIntegers.encode(len(body)) + body
    return props


def _props_body(props: Properties) -> bytes:
    """The packed properties without their length prefix."""
    packed = props.pack()
    n = 1
    while packed[n - 1] & 0x80:             # the variable byte integer's continuation bit
        n += 1
    return packed[n:]


#: the content type alone (no request/response): shared, never mutated, packed once
_CONTENT_PROPS: dict[str, Properties | None] = {
    k: _packed_props(_content_props(k), _props_body(_content_props(k))) for k in ("json", "frame")}
_CONTENT_PROPS["other"] = None


class _Client(mqtt.Client):
    """paho's client reading the socket 64 KiB at a time.

    Stock paho reads a packet with three or more ``recv`` calls (the command byte, each length
    byte, the rest), and ``loop_read`` takes one packet per call: a burst of telemetry cost one
    selector wake-up and ~4 system calls per message. Here one ``recv`` fills a buffer that paho's
    parser then reads from, and the link's ``_read`` keeps calling ``loop_read`` while it holds
    bytes (as for a TLS socket's decrypted ``pending()``); the buffer belongs to one socket and
    is dropped with it."""

    READ_SIZE = 65536

    def __init__(self, *args: object, **kw: object) -> None:
        super().__init__(*args, **kw)  # type: ignore[arg-type]
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None

    def buffered(self) -> bool:
        """Bytes read from the socket that paho has not parsed yet."""
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._rsock is not self._sock:                  # a new connection: nothing carries over
            self._rbuf, self._rpos, self._rsock = b"", 0, self._sock
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, self.READ_SIZE))   # BlockingIOError etc. as paho's
            if len(data) <= bufsize:
                return data                               # all of it asked for (or EOF): no copy kept
            self._rbuf, self._rpos = data, 0
        end = self._rpos + bufsize
        out = self._rbuf[self._rpos:end]
        self._rpos = min(end, len(self._rbuf))
        return out

    def _sock_close(self) -> None:
        self._rbuf, self._rpos, self._rsock = b"", 0, None
        super()._sock_close()


#: paho 2.x reads through ``Client._sock_recv``; another layout keeps paho's own reads
_CLIENT = _Client if callable(getattr(mqtt.Client, "_sock_recv", None)) else mqtt.Client


class _PahoErrors(logging.Logger):
    """paho's logger for one link: ERROR and above only (``isEnabledFor`` stops the rest before any
    formatting), each handed to the link's ``_cb_log`` (why a socket failed)."""

    def __init__(self, link: "MqttLink") -> None:
        super().__init__(f"{__name__}.paho", logging.ERROR)
        self.propagate = False
        self._link = link

    def handle(self, record: logging.LogRecord) -> None:
        self._link._cb_log(None, None, mqtt.MQTT_LOG_ERR, record.getMessage())


class MqttLink:
    """One MQTT session, reconnecting forever until ``stop()``."""

    def __init__(self, client_id: str, broker: BrokerAddress, *, protocol: str = "auto",
                 keepalive: int = 30, will: "Will | Callable[[], Will] | None" = None, tls: TlsFiles | None = None,
                 subscriptions: list[tuple[str, int]] | None = None,
                 on_connect: Callable[[], Awaitable[None] | None] | None = None,
                 min_backoff: float = 0.5, max_backoff: float = 30.0, queue_size: int = 10000,
                 persistent: bool = False, session_expiry_s: int = 7 * 86400,
                 on_disconnect: Callable[[str], None] | None = None, manual_ack: bool = False,
                 on_connect_error: Callable[[str], None] | None = None,
                 on_takeover: Callable[[float], None] | None = None) -> None:
        """``persistent``: keep the broker session (subscriptions + queued QoS 1 messages) across
        disconnects and restarts, so nothing sent to us while we were away is lost.

        Inbound flow control: at most ``queue_size`` messages wait for the consumer; past that the
        network thread waits (the broker holds the rest) — nothing the broker handed us is dropped.
        ``manual_ack``: a QoS 1 message is acknowledged only when the consumer calls ``ack(msg)``
        (after it stored it): a crash before that and the broker delivers it again.

        Failures are never silent: a failed connect attempt is logged at WARNING with the address and
        the reason (refused, TLS, authentication, DNS, timeout) the first time, when the reason
        changes, and at most once a minute while it lasts; ``on_connect_error(reason)`` hears every
        one. A lost session logs its reason; one taken over again and again by another client with
        our id logs an ERROR and backs off (``on_takeover(backoff_s)``). A publish or subscription the
        broker refuses as "not authorized" logs an ERROR naming our id and our certificate's CN."""
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
        self.connected = asyncio.Event()
        self.dropped_incoming = 0
        self.connects = 0
        self.disconnects = 0
        self.last_error: str | None = None
        self.connack_timeout = 3.0
        self.on_connect_error = on_connect_error
        self.on_takeover = on_takeover
        self.failures = linkreport.FailureLog()
        self.takeover = linkreport.TakeoverDetector()
        #: set while the broker keeps pushing us off (another client with our id): the back-off in s
        self.taken_over_backoff: float | None = None
        self._session_started: float | None = None   # paho thread: when the current session began
        self._socket_error: tuple[float, str] | None = None   # paho thread: its last socket error
        self._mids: dict[int, str] = {}              # QoS >= 1 publish / subscribe mid -> topic (for refusals)
        self._refused_logged: set[str] = set()
        self.refused = 0                             # publishes/subscriptions the broker refused
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: mqtt.Client | None = None
        self._v5 = protocol != "3.1.1"
        self._stopping = False
        self._tasks: set[asyncio.Task] = set()
        #: mid -> future resolved by the broker's PUBACK (aiomqtt's _pending_publishes)
        self._pending: dict[int, asyncio.Future] = {}
        #: QoS >= 1 publishes paho holds until their PUBACK (``reconnect_with`` waits for them)
        self._unacked: set[int] = set()
        self._loop_thread: int | None = None
        self._misc_task: asyncio.Future | None = None
        self._paused = False
        self._reading = False        # inside loop_read: what paho queues is written when it returns
        self._flush_soon = False     # a _flush is scheduled
        self._writer_on = False      # the socket is in the selector for writing
        self._paho_log = _PahoErrors(self)
        #: optional ``dispatch(msg) -> bool`` run as each message is parsed (on the loop thread):
        #: True = handled, not queued. For what needs no flow control (replies a caller awaits):
        #: one loop turn and one task switch less than the queue.
        self.dispatch: Callable[[Message], bool] | None = None

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
        self._loop_thread = threading.get_ident()
        self._start_client()

    def _start_client(self) -> None:
        proto = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        c = _CLIENT(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=proto,
                        clean_session=None if self._v5 else not self.persistent, manual_ack=self.manual_ack)
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls or (self.tls and self.tls.ca_file):
            t = self.tls or TlsFiles()
            try:
                c.tls_set(ca_certs=t.ca_file, certfile=t.cert_file, keyfile=t.key_file,
                          cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise tls_config_error(t, exc) from None
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
        c.max_queued_messages_set(10000)
        c.on_connect = self._cb_connect
        c.on_disconnect = self._cb_disconnect
        c.on_message = self._cb_message
        c.on_publish = self._cb_publish
        c.on_socket_open = self._cb_socket_open
        c.on_socket_close = self._cb_socket_close
        c.on_socket_register_write = self._cb_want_write
        c.on_socket_unregister_write = self._cb_done_writing
        c.on_connect_fail = self._cb_connect_fail
        # paho's errors through a logger, not on_log: on_log makes paho %-format a debug line (with
        # str(Properties)) for every packet in and out; a logger at ERROR formats only errors
        c.enable_logger(self._paho_log)
        c.on_subscribe = self._cb_subscribe
        self._client = c
        self.messages.on_room = self._resume_reading  # type: ignore[attr-defined]
        if self._v5:
            props = None
            if self.persistent:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.session_expiry_s
            c.connect_async(self.broker.host, self.broker.port, self.keepalive,
                            clean_start=not self.persistent, properties=props)
        else:
            c.connect_async(self.broker.host, self.broker.port, self.keepalive)
        self._spawn(self._connect_loop(c, first=True))
        if self._misc_task is None or self._misc_task.done():
            self._misc_task = asyncio.ensure_future(self._misc())

    def _jittered_min(self) -> float:
        return self.min_backoff * random.uniform(0.5, 1.5)

    # -- the network, inside the loop ---------------------------------------
    async def _connect_loop(self, c: mqtt.Client, first: bool = False, delay: float | None = None) -> None:
        """(Re)connect ``c`` until it has a socket: the blocking TCP/TLS connect in an executor,
        jittered exponential backoff between attempts (``delay``: the first wait, e.g. the
        take-over backoff). The CONNACK arrives through loop_read."""
        if not first:
            await asyncio.sleep(delay if delay else self._jittered_min())
        delay = self.min_backoff
        while not self._stopping and c is self._client:
            try:
                rc = await asyncio.get_running_loop().run_in_executor(None, c.reconnect)
                if rc == mqtt.MQTT_ERR_SUCCESS:
                    return
                self.last_error = f"connect: {mqtt.error_string(rc)}"
            except (OSError, ssl.SSLError, ValueError) as exc:
                self.takeover.connect_failed()
                self._on_connect_failed(c, linkreport.describe_exception(exc, self.broker.host, self.broker.port))
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(self.max_backoff, delay * 2)

    async def _misc(self) -> None:
        """paho's keepalive (PINGREQ, and a dead broker noticed) once a second."""
        while not self._stopping:
            await asyncio.sleep(1.0)
            c = self._client
            if c is not None and c.socket() is not None:
                c.loop_misc()

    def _on_loop_thread(self) -> bool:
        return self._loop_thread == threading.get_ident()

    def _in_loop(self, fn: Callable, *args: object) -> None:
        """Run ``fn`` now on the loop thread, or hand it over (paho calls some hooks from the
        connect executor)."""
        if self._on_loop_thread():
            fn(*args)
        else:
            self._post(fn, *args)

    def _read(self, c: mqtt.Client) -> None:
        if c is not self._client:
            return
        self._reading = True
        try:
            c.loop_read()
            # what one recv brought (up to 64 KiB: a burst of messages) is parsed now, not one
            # packet per selector turn; at most 256 packets before the other tasks get a turn
            for _ in range(255):
                if self._paused or c.socket() is None or not (isinstance(c, _Client) and c.buffered()):
                    break
                c.loop_read()
        finally:
            self._reading = False
        if c.want_write() and not self._flush_soon:
            # PUBACKs go out this loop turn, after the consumers that the read woke: a reply they
            # publish at once shares the write (one send, one broker wake-up, not two)
            self._flush_soon = True
            self._loop.call_soon(self._flush_scheduled, c)  # type: ignore[union-attr]
        sock = c.socket()
        if sock is None or self._paused:
            return
        if (isinstance(c, _Client) and c.buffered()) or (isinstance(sock, ssl.SSLSocket) and sock.pending()):
            self._loop.call_soon(self._read, c)  # type: ignore[union-attr]  # bytes epoll cannot see

    def _write(self, c: mqtt.Client) -> None:
        if c is self._client:
            c.loop_write()

    def _flush(self, c: mqtt.Client) -> None:
        """Write what paho queued, now, on the loop thread: a small packet goes straight into the
        socket (no selector registration, no extra loop turn); only a write the socket cannot take
        whole waits for the selector to say it drained."""
        self._flush_soon = False
        if c is not self._client or c.socket() is None:
            return
        c.loop_write()
        if c.want_write() and not self._writer_on:
            self._add_writer(c, c.socket())

    def _cb_want_write(self, client, userdata, sock) -> None:
        if not self._on_loop_thread():
            self._post(self._add_writer, client, sock)   # the connect executor: CONNECT via the selector
        elif not self._reading and not self._flush_soon and self._loop is not None:
            # queued by a publish, the keepalive or a disconnect: written once the caller returns
            # (publish() writes at once; this catches the rest, once per loop turn)
            self._flush_soon = True
            self._loop.call_soon(self._flush_scheduled, client)

    def _flush_scheduled(self, c: mqtt.Client) -> None:
        if self._flush_soon:                  # not already written by publish() or a read
            self._flush(c)

    def _add_writer(self, client: mqtt.Client, sock) -> None:
        if client is self._client and client.socket() is sock and self._loop is not None:
            self._writer_on = True
            self._loop.add_writer(sock, self._write, client)

    def _cb_done_writing(self, client, userdata, sock) -> None:
        self._in_loop(self._remove_writer, sock)

    def _remove_writer(self, sock) -> None:
        if not self._writer_on:
            return
        self._writer_on = False
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.remove_writer(sock)
            except (ValueError, OSError):  # already closed
                pass

    def _add_reader(self, client: mqtt.Client, sock) -> None:
        if client is self._client and client.socket() is sock and self._loop is not None:
            self._paused = False
            self._loop.add_reader(sock, self._read, client)

    def _cb_socket_close(self, client, userdata, sock) -> None:
        # synchronous on the loop thread: the fd must leave the selector before it is closed
        if self._loop is None or self._loop.is_closed():
            return
        self._writer_on = False
        try:
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)
        except (ValueError, OSError, RuntimeError):
            pass

    def _pause_reading(self) -> None:
        c = self._client
        if not self._paused and c is not None and c.socket() is not None and self._loop is not None:
            self._paused = True
            self._loop.remove_reader(c.socket())

    def _resume_reading(self) -> None:
        c = self._client
        if self._paused and c is not None and c.socket() is not None and self._loop is not None:
            self._paused = False
            self._loop.add_reader(c.socket(), self._read, c)
            self._loop.call_soon(self._read, c)   # paho may hold bytes it read before the pause

    async def stop(self, timeout: float = 1.0) -> None:
        """Clean disconnect (no last will is sent): the DISCONNECT is flushed, the socket closed."""
        self._stopping = True
        c = self._client
        if c is None:
            return
        try:
            c.disconnect()
            deadline = time.monotonic() + timeout
            while c.socket() is not None and c.want_write() and time.monotonic() < deadline:
                c.loop_write()                       # writes the DISCONNECT; paho closes after it
                if c.want_write():
                    await asyncio.sleep(0.01)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass
        if c.socket() is not None:
            try:
                c._sock_close()                      # paho's own close: runs on_socket_close first
            except Exception:  # noqa: BLE001
                pass
        self.connected.clear()
        self._fail_pending()
        for t in list(self._tasks) + ([self._misc_task] if self._misc_task else []):
            t.cancel()

    def kill(self) -> None:
        """Drop the connection with no DISCONNECT (the broker then sends the will), as a crash
        would, and never reconnect: for fault tests and drills."""
        self._stopping = True
        c = self._client
        if c is not None and c.socket() is not None:
            sock = c.socket()
            self._cb_socket_close(c, None, sock)
            sock.close()
        for t in list(self._tasks) + ([self._misc_task] if self._misc_task else []):
            t.cancel()

    def _fail_pending(self) -> None:
        """Publishes of a client that is gone will never be acknowledged: they were not sent."""
        pending, self._pending = self._pending, {}
        self._unacked.clear()
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
        """Run ``fn`` on the loop soon (after the paho callback returns); thread-safe."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                if self._on_loop_thread():
                    loop.call_soon(fn, *args)
                else:
                    loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closing during shutdown
                pass

    def _cb_connect(self, client, userdata, flags, rc, props=None) -> None:
        code = rc.value if hasattr(rc, "value") else int(rc)
        if code == 0:
            self._session_started = time.monotonic()
        else:
            self.takeover.connect_failed()
        self._post(self._on_connect, client, code, str(rc))

    def _cb_log(self, client, userdata, level, buf) -> None:
        # paho says why a socket failed only in its log ("failed to receive on socket: [Errno 104] ...")
        if level == mqtt.MQTT_LOG_ERR and "socket" in buf:
            self._socket_error = (time.monotonic(), buf)

    def _cb_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its `except OSError:` around the connect: the exception is current
        self.takeover.connect_failed()
        reason = linkreport.describe_exception(sys.exc_info()[1], self.broker.host, self.broker.port)
        self._post(self._on_connect_failed, client, reason)

    def _cb_socket_open(self, client, userdata, sock) -> None:
        set_nodelay(sock)
        self._in_loop(self._add_reader, client, sock)
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
        from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
        sock_err, self._socket_error = self._socket_error, None
        recent = sock_err[1] if sock_err and time.monotonic() - sock_err[0] < 5 else None
        reason = linkreport.describe_loss(str(rc), from_server, recent)
        backoff = None
        if self._session_started is not None and not self._stopping:
            now = time.monotonic()
            backoff = self.takeover.lost(now, str(rc) if from_server else None, now - self._session_started)
        elif not self._stopping:
            # closed before any CONNACK: a failed connect too (e.g. the broker refused our TLS client
            # certificate after the handshake); the auto protocol's 3.1.1 fallback gets its turn first
            self.takeover.connect_failed()
            if not (self.protocol == "auto" and self._v5 and self.connects == 0):
                why = (linkreport.describe_socket_error(recent, during_connect=True) if recent else
                       "the broker closed the connection before accepting it (a client certificate it does not "
                       "trust? not an MQTT port?)")
                self._post(self._on_connect_failed, client, why)
        self._session_started = None
        self._post(self._on_disconnect, client, reason, backoff)

    def _cb_subscribe(self, client, userdata, mid, reason_codes, props=None) -> None:
        refused = [str(rc) for rc in (reason_codes or []) if getattr(rc, "is_failure", False)]
        if refused:
            self._post(self._on_refused, client, mid, refused[0])

    def _cb_message(self, client, userdata, m) -> None:
        rt = corr = ctype = None
        props = getattr(m, "properties", None)
        if props is not None:
            rt = getattr(props, "ResponseTopic", None)
            corr = getattr(props, "CorrelationData", None)
            ctype = getattr(props, "ContentType", None)
        msg = Message(m.topic, bytes(m.payload), m.qos, bool(m.retain), rt, corr, m.mid if m.qos else 0, ctype)
        take = self.dispatch
        if take is not None:
            try:
                if take(msg):
                    return                      # handled on the spot (a reply a caller awaits)
            except Exception:  # noqa: BLE001 - the consumer's bug must not break paho's read
                log.exception("message dispatch failed on %s; queued instead", msg.topic)
        if not self.messages.offer(msg):  # type: ignore[attr-defined]
            self._pause_reading()               # the consumer is behind: stop reading until it catches up

    def _cb_publish(self, client, userdata, mid, rc=None, props=None) -> None:
        # posted to the loop: the future for this mid is registered before the loop runs this
        refused = str(rc) if rc is not None and getattr(rc, "is_failure", False) else None
        self._post(self._on_published, client, mid, refused)

    # -- loop thread -----------------------------------------------------
    def _on_published(self, client: mqtt.Client, mid: int, refused: str | None = None) -> None:
        if client is not self._client:
            return
        self._unacked.discard(mid)
        if refused:
            self._on_refused(client, mid, refused)
        else:
            self._mids.pop(mid, None)
        fut = self._pending.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(refused is None)   # acknowledged with a refusal is not sent

    def _on_refused(self, client: mqtt.Client, mid: int, reason: str) -> None:
        """The broker acknowledged a publish or subscription with a refusal (MQTT 5 reason code)."""
        topic = self._mids.pop(mid, f"(message {mid})")
        self.refused += 1
        if topic in self._refused_logged or (reason.lower() == "not authorized" and self._refused_logged):
            # said once (with the id and the CN); every further refusal is counted, not repeated
            log.debug("the broker refused %s: %s (%d refusals)", topic, reason, self.refused)
            return
        if len(self._refused_logged) < 256:
            self._refused_logged.add(topic)
        if reason.lower() == "not authorized":
            cn = linkreport.certificate_cn(self.tls.cert_file if self.tls else None)
            log.error("%s", linkreport.not_authorized_text(topic, self.client_id, cn, self.broker.username))
        else:
            log.error("the broker refused %s: %s", topic, reason)

    def _on_connect_failed(self, client: mqtt.Client, reason: str) -> None:
        if client is not self._client or self._stopping:
            return
        self.last_error = reason
        if self.failures.failed(reason, time.monotonic()):
            n = self.failures.failures
            log.warning("cannot connect to %s as %s: %s%s", self.broker.url, self.client_id, reason,
                        f" ({n} attempts so far; retrying)" if n > 1 else " (retrying)")
        if self.on_connect_error:
            self.on_connect_error(reason)

    def ack(self, msg: Message) -> None:
        """With ``manual_ack``: acknowledge a QoS 1 message the consumer has stored."""
        c = self._client
        if self.manual_ack and msg.qos and msg.mid and c is not None:
            c.ack(msg.mid, msg.qos)

    def _on_connect(self, client: mqtt.Client, rc: int, reason: str) -> None:
        if client is not self._client or self._stopping:
            return
        if rc != 0:
            if self.protocol == "auto" and self._v5 and rc in (1, 0x84):
                self.last_error = reason
                log.info("broker %s does not speak MQTT 5 (%s); falling back to 3.1.1", self.broker.url, reason)
                self._v5 = False
                self._client = None
                self._spawn(self._restart(client))
            else:
                self._on_connect_failed(client, linkreport.describe_refusal(reason))
            return
        self.connects += 1
        self.last_error = None
        self.taken_over_backoff = None
        failed = self.failures.connected()
        for flt, qos in self.subscriptions:
            self._subscribe(client, flt, qos)
        self.connected.set()
        log.info("connected to %s as %s (MQTT %s)%s", self.broker.url, self.client_id, "5" if self._v5 else "3.1.1",
                 f" after {failed} failed attempts" if failed else "")
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
            if old.socket() is not None:
                old._sock_close()
        except Exception:  # noqa: BLE001
            pass
        if not self._stopping:
            self._start_client()

    def _on_disconnect(self, client: mqtt.Client, reason: str, backoff: float | None = None) -> None:
        if client is not self._client:
            return
        was = self.connected.is_set()
        self.connected.clear()
        if not self._stopping and client.socket() is None:
            # someone else uses our id (backoff): let it be for a while instead of pushing it off
            self._spawn(self._connect_loop(client, delay=backoff))
        if was:
            self.disconnects += 1
            if not self._stopping:
                self.last_error = reason
                if backoff:
                    self.taken_over_backoff = backoff
                    reason = f"session taken over by another client with id {self.client_id}"
                    log.error("%s: another process is using id %s (the broker closed our connection right after "
                              "each reconnect, %d times in a row); waiting %.0f s before reconnecting instead of "
                              "pushing it off", reason, self.client_id, self.takeover.limit, backoff)
                    self.last_error = reason
                    if self.on_takeover:
                        self.on_takeover(backoff)
                else:
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
            self._subscribe(self._client, flt, qos)

    def _subscribe(self, client: mqtt.Client, flt: str, qos: int) -> None:
        rc, mid = client.subscribe(flt, qos)
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._mids[mid] = f"subscription {flt}"

    def _props(self, response_topic: str | None, correlation: bytes | None,
               payload: bytes = b"") -> Properties | None:
        """MQTT 5 properties (None on 3.1.1, where the envelope carries what matters): the content
        type, so a dashboard can tell JSON from a binary frame before parsing, and request/response."""
        if not self._v5:
            return None
        kind = content_kind(payload)
        if not (response_topic or correlation):
            return _CONTENT_PROPS[kind]   # shared, never mutated: no allocation per message
        return _reply_props(kind, response_topic, correlation)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, *,
                response_topic: str | None = None, correlation: bytes | None = None) -> bool:
        """Hand a message to paho. False if it could not be accepted (not connected)."""
        c = self._client
        if c is None or not self.connected.is_set():
            return False
        props = self._props(response_topic, correlation, payload)
        info = c.publish(topic, payload, qos, retain, properties=props)
        if qos and info.rc == mqtt.MQTT_ERR_SUCCESS:
            self._unacked.add(info.mid)
            self._track(info.mid, topic)
        self._write_now(c)
        return info.rc == mqtt.MQTT_ERR_SUCCESS

    def _write_now(self, c: mqtt.Client) -> None:
        """After a publish on the loop thread: onto the wire before the caller awaits anything."""
        if self._flush_soon and not self._reading and not self._writer_on and self._on_loop_thread():
            self._flush(c)

    def _track(self, mid: int, topic: str) -> None:
        if len(self._mids) > 20000:    # acks that never came (a dropped session): forget the oldest
            for k in list(self._mids)[:10000]:
                del self._mids[k]
        self._mids[mid] = topic

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
        self._track(info.mid, topic)
        self._write_now(c)
        fut.add_done_callback(lambda f, mid=info.mid: self._pending.pop(mid, None) if f.cancelled() else None)
        return fut

    async def reconnect_with(self, tls: TlsFiles, drain_timeout: float = 10.0) -> None:
        """Switch to new TLS files (a renewed certificate): stop taking publishes (callers fall
        back to their outbox), wait until the broker acknowledged what paho holds in flight —
        a new client does not re-send the old one's — then reconnect with ``tls``. Subscriptions
        and the inbound queue carry over."""
        old = self._client
        self.connected.clear()
        deadline = asyncio.get_running_loop().time() + drain_timeout
        while (self._unacked or self._pending) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        self.tls = tls
        self._client = None
        self._unacked.clear()
        if old is not None:
            await self._restart(old)
        elif not self._stopping:
            self._start_client()

    async def publish_and_wait(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
                               timeout: float = 1.0) -> bool:
        """Publish and wait until the broker acknowledged it (QoS 1) or ``timeout``."""
        fut = self.publish_acked(topic, payload, qos, retain)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return False


async def try_connect(link: MqttLink, timeout: float = 10.0) -> str | None:
    """Connect once and disconnect: None when the broker accepted us, else the reason of the first
    failure (refused, TLS, authentication, DNS) or a timeout. For ``check --connect`` and fail-fast
    CLI commands."""
    failed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    previous = link.on_connect_error

    def first(reason: str) -> None:
        if not failed.done():
            failed.set_result(reason)
        if previous:
            previous(reason)

    link.on_connect_error = first
    await link.start()
    ok = asyncio.ensure_future(link.connected.wait())
    try:
        done, _ = await asyncio.wait({ok, failed}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if ok in done:
            return None
        if failed in done:
            return failed.result()
        return link.last_error or f"no answer from {link.broker.url} within {timeout:.0f} s"
    finally:
        ok.cancel()
        link.on_connect_error = previous
        await link.stop()
