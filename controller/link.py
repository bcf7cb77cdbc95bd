"""The controller's MQTT connections (service, CLI client, offload workers) from its config."""
from __future__ import annotations

from typing import Any, Callable

from protocol.mqttlink import MqttLink, Will

from .config import ControllerConfig


def make_link(cfg: ControllerConfig, client_id: str, *, will: Will | None = None,
              subscriptions: list[tuple[str, int]] | None = None,
              on_connect: Callable[[], Any] | None = None, persistent: bool = False,
              manual_ack: bool = False) -> MqttLink:
    return MqttLink.from_settings(cfg.mqtt, client_id, will=will, subscriptions=subscriptions,
                                  on_connect=on_connect, persistent=persistent, manual_ack=manual_ack)
