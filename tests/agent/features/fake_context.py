"""A recording ``AgentContext``: features run against it with no broker and no daemon.

Everything a feature publishes, replies or emits is kept in lists; ``connected`` is a plain
attribute, so a test decides whether the link is up.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
from typing import Any

from agent.core.config import AgentConfig, parse_config
from agent.core.counters import Counters
from protocol import envelope as env_mod
from protocol.binary import Frame, decode_frame, is_frame
from protocol.envelope import DecodeError, Envelope
from protocol.mqttlink import Message
from protocol.topics import Topics


@dataclass
class Published:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    reliable: bool
    props: dict[str, Any] = field(default_factory=dict)

    @property
    def body(self) -> dict[str, Any]:
        if is_frame(self.payload):
            return decode_frame(self.payload).envelope.body
        return json.loads(self.payload)["body"]


class FakeContext:
    def __init__(self, cfg: AgentConfig | None = None, **overrides: Any) -> None:
        self.cfg = cfg or parse_config({"device": {"id": "pi-t"}, **overrides})
        self.device_id = self.cfg.device.id
        self.topics = Topics(self.cfg.mqtt.topic_root)
        self.counters = Counters(self.topics, self.cfg.homeassistant.prefix)
        self.connected = True
        self.published: list[Published] = []
        self.replies: list[tuple[Envelope, dict[str, Any]]] = []
        self.events: list[dict[str, Any]] = []
        self.states = 0
        self.announcements = 0

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **props: Any) -> bool:
        if not self.connected:
            return False
        self.published.append(Published(topic, payload, qos, retain, False, props))
        return True

    def publish_reliable(self, kind: str, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        self.published.append(Published(topic, payload, qos, retain, True))
        return self.connected

    def reply(self, request: Envelope, msg: Message | None, body: dict[str, Any]) -> bool:
        self.replies.append((request, body))
        return True

    def emit_event(self, event: str, level: str = "info", **data: Any) -> bool:
        self.events.append({"event": event, "level": level, **data})
        return True

    def republish_state(self) -> None:
        self.states += 1

    def announce_discovery(self) -> None:
        self.announcements += 1

    def decode(self, msg: Message) -> "tuple[Envelope, Frame | None] | None":
        try:
            if is_frame(msg.payload):
                f = decode_frame(msg.payload)
                return f.envelope, f
            return env_mod.decode(msg.payload), None
        except DecodeError as exc:
            self.counters.reject(exc.reason)
            return None

    # -- reading what happened ---------------------------------------------------
    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == event]

    def on(self, suffix: str) -> list[Published]:
        return [p for p in self.published if p.topic.endswith(suffix)]

    @property
    def rejected(self) -> dict[str, int]:
        return dict(self.counters.rejected)
