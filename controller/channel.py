"""ControlChannel: the one place the controller builds, signs and sends what devices act on.

Commands, ``fl.*`` messages, offers and chunk frames go to a device's (or a group's) ``cmd``
topic, signed end to end with the controller's Ed25519 key when one is configured
(``protocol.cmdauth``: the signature covers the topic, so a captured message cannot be
re-targeted). The retained desired-version state is published here too, unsigned as before.

No socket inside: the channel is given a ``publish`` function (``MqttLink.publish`` or a
recorder in tests) and a ``connected`` probe, so it is tested without a broker.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Callable, Mapping, Protocol

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.cmdauth import sign_envelope, sign_frame
from protocol.config_loader import ConfigError
from protocol.envelope import Envelope, encode
from protocol.topics import Topics


class Publish(Protocol):
    def __call__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        """Queue one message; False when it could not be (not connected)."""


class Acked(Protocol):
    """What ``publish_acked`` returns (``asyncio.Future[bool]`` from ``MqttLink.publish_acked``)."""

    def add_done_callback(self, fn: Callable[["Acked"], Any]) -> None: ...

    def result(self) -> bool: ...

    def cancelled(self) -> bool: ...


class PublishAcked(Protocol):
    def __call__(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> Acked:
        """Publish at QoS 1; the result resolves True when the broker acknowledged it (PUBACK)."""


def _resolved(ok: bool) -> Acked:
    fut: concurrent.futures.Future[bool] = concurrent.futures.Future()
    fut.set_result(ok)
    return fut


def load_signing_key(path: str) -> Ed25519PrivateKey | None:
    """The controller's private key from ``security.signing_key`` (None when unset)."""
    if not path:
        return None
    from protocol.signing import SignatureError, load_private

    try:
        return load_private(path)
    except SignatureError as exc:
        raise ConfigError(f"security.signing_key: {exc}") from None


class ControlChannel:
    def __init__(self, topics: Topics, sender: str, publish: Publish, key: Ed25519PrivateKey | None = None,
                 connected: Callable[[], bool] = lambda: True, publish_acked: PublishAcked | None = None) -> None:
        """``publish_acked`` (``MqttLink.publish_acked``): what the ``*_acked`` sends use; without one they
        fall back to ``publish`` and count "queued" as acknowledged (recorders in tests)."""
        self.topics = topics
        self.sender = sender
        self.key = key
        self._publish = publish
        self._publish_acked = publish_acked
        self._connected = connected

    @property
    def signed(self) -> bool:
        return self.key is not None

    def connected(self) -> bool:
        return self._connected()

    # -- building -------------------------------------------------------------
    def envelope(self, topic: str, kind: str, body: Mapping[str, Any], *, reply_to: str | None = None,
                 corr: str | None = None) -> Envelope:
        """An envelope from the controller for ``topic``, signed for that topic when a key is set."""
        env = Envelope(kind=kind, sender=self.sender, body=dict(body), reply_to=reply_to, corr=corr)
        return sign_envelope(env, topic, self.key) if self.key is not None else env

    def command_envelope(self, device_id: str, command: str, args: Mapping[str, Any] | None = None, *,
                         reply_to: str | None = None, corr: str | None = None) -> tuple[str, Envelope]:
        """``(topic, envelope)`` of a ``cmd`` to ``device_id`` (the CLI's request/response publishes it)."""
        topic = self.topics.cmd(device_id)
        return topic, self.envelope(topic, "cmd", {"command": command, "args": dict(args or {})},
                                    reply_to=reply_to, corr=corr)

    def frame(self, topic: str, kind: str, body: Mapping[str, Any], *,
              tensors: Mapping[str, np.ndarray] | None = None, blob: bytes = b"") -> bytes:
        """A binary frame whose signature (when a key is set) also covers its payload."""
        return sign_frame(Envelope(kind=kind, sender=self.sender, body=dict(body)), topic, self.key, tensors, blob)

    # -- sending --------------------------------------------------------------
    def send(self, device_id: str, kind: str, body: Mapping[str, Any], *, qos: int = 1) -> bool:
        """A JSON envelope to ``device_id``'s cmd topic. False when it could not be queued."""
        topic = self.topics.cmd(device_id)
        return self._publish(topic, encode(self.envelope(topic, kind, body)), qos)

    def send_frame(self, device_id: str, kind: str, body: Mapping[str, Any], *,
                   tensors: Mapping[str, np.ndarray] | None = None, blob: bytes = b"", qos: int = 1) -> bool:
        """A binary frame (tensors or a blob) to ``device_id``'s bin topic (cmd carries only JSON)."""
        topic = self.topics.bin(device_id)
        return self._publish(topic, self.frame(topic, kind, body, tensors=tensors, blob=blob), qos)

    def _acked(self, topic: str, payload: bytes, qos: int) -> Acked:
        if self._publish_acked is None:
            return _resolved(self._publish(topic, payload, max(1, qos)))
        return self._publish_acked(topic, payload, max(1, qos))

    def send_acked(self, device_id: str, kind: str, body: Mapping[str, Any], *, qos: int = 1) -> Acked:
        """``send``, resolving True once the broker acknowledged it: what a store may call "sent"."""
        topic = self.topics.cmd(device_id)
        return self._acked(topic, encode(self.envelope(topic, kind, body)), qos)

    def send_frame_acked(self, device_id: str, kind: str, body: Mapping[str, Any], *,
                         tensors: Mapping[str, np.ndarray] | None = None, blob: bytes = b"", qos: int = 1) -> Acked:
        """``send_frame``, resolving True once the broker acknowledged it."""
        topic = self.topics.bin(device_id)
        return self._acked(topic, self.frame(topic, kind, body, tensors=tensors, blob=blob), qos)

    def command(self, device_id: str, command: str, args: Mapping[str, Any] | None = None) -> bool:
        """Fire-and-forget ``cmd`` (the reply, if any, lands in the device's own subtree)."""
        topic, env = self.command_envelope(device_id, command, args)
        return self._publish(topic, encode(env), 1)

    def send_group(self, group: str, kind: str, body: Mapping[str, Any], *, qos: int = 1) -> bool:
        """One envelope to every device of ``group`` (their shared group cmd topic)."""
        topic = self.topics.group_cmd(group)
        return self._publish(topic, encode(self.envelope(topic, kind, body)), qos)

    def command_group(self, group: str, command: str, args: Mapping[str, Any] | None = None) -> bool:
        return self.send_group(group, "cmd", {"command": command, "args": dict(args or {})})

    def set_desired(self, device_id: str, body: Mapping[str, Any]) -> bool:
        """The retained ``ctl.state`` naming the version wanted on ``device_id`` (not a command: unsigned)."""
        env = Envelope(kind="ctl.state", sender=self.sender, body=dict(body))
        return self._publish(self.topics.desired(device_id), encode(env), 1, True)
