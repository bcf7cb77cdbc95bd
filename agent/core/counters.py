"""Message and byte counters, by topic class and by reject reason.

Operators on metered links want to know where the bytes go, so every publish and
every received message is charged to a class (state, telemetry, events, reply,
data, cmd, req, hass, other).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from protocol.topics import Topics


class Counters:
    def __init__(self, topics: Topics, hass_prefix: str = "homeassistant") -> None:
        self.topics = topics
        self.hass_prefix = hass_prefix + "/"
        self.tx_msgs: Counter[str] = Counter()
        self.rx_msgs: Counter[str] = Counter()
        self.tx_bytes: Counter[str] = Counter()
        self.rx_bytes: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.events: Counter[str] = Counter()

    def topic_class(self, topic: str) -> str:
        parsed = self.topics.parse(topic)
        if parsed:
            return parsed[1]
        if topic.startswith(self.hass_prefix):
            return "hass"
        if topic.startswith(self.topics.base + "/group/"):
            return "cmd"
        if topic.startswith(self.topics.base + "/offload/"):
            return "offload"
        return "other"

    def sent(self, topic: str, nbytes: int) -> None:
        cls = self.topic_class(topic)
        self.tx_msgs[cls] += 1
        self.tx_bytes[cls] += nbytes

    def received(self, topic: str, nbytes: int) -> None:
        cls = self.topic_class(topic)
        self.rx_msgs[cls] += 1
        self.rx_bytes[cls] += nbytes

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "msgs": {"tx": dict(self.tx_msgs), "rx": dict(self.rx_msgs),
                     "rejected": dict(self.rejected)},
            "bytes": {"tx": dict(self.tx_bytes), "rx": dict(self.rx_bytes),
                      "tx_total": sum(self.tx_bytes.values()), "rx_total": sum(self.rx_bytes.values())},
        }
