"""The MQTT edge's plain parts, with no network and no paho: broker URLs and addresses, TLS
files, the last will, the ``Message`` consumers see, the ``[mqtt]`` settings, content types.

Split from ``protocol.mqttlink`` (which re-exports every name) so that loading a config or
parsing ``--broker`` does not import paho: ``fleetctl devices --json`` and ``--help`` stay light.
"""
from __future__ import annotations

from dataclasses import dataclass
import socket
from urllib.parse import urlsplit, unquote

PROTOCOLS = ("auto", "5", "3.1.1")


def set_nodelay(sock: object) -> bool:
    """TCP_NODELAY on a paho socket (plain or TLS): request/response over MQTT otherwise waits
    ~40 ms per hop on Nagle + the peer's delayed ACK. False where the socket is not TCP."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]
        return True
    except (AttributeError, OSError):
        return False


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


def tls_config_error(t: TlsFiles, exc: BaseException) -> "Exception":
    """A TLS file paho/ssl could not load, as a ConfigError naming the file (no traceback)."""
    import os

    from .config_loader import ConfigError

    for key, path in (("mqtt.ca_file", t.ca_file), ("mqtt.cert_file", t.cert_file), ("mqtt.key_file", t.key_file)):
        if path and not os.access(path, os.R_OK):
            why = "does not exist" if not os.path.exists(path) else "is not readable by this user"
            return ConfigError(f"{key} {path} {why}")
    names = ", ".join(p for p in (t.ca_file, t.cert_file, t.key_file) if p)
    return ConfigError(f"mqtt TLS files ({names}): {getattr(exc, 'reason', None) or exc}")


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
