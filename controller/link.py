"""The controller's MQTT connections (service, CLI client, offload workers) from its config.

Identities: ``fleetctl serve`` connects as the controller (``[mqtt]``: the ``controller``
certificate or user), each offload worker as itself, and the CLI as an operator (``[cli]``).
The broker names every connection after its certificate or user (``use_username_as_clientid``
in configs/mosquitto), so two connections under one identity push each other off; the client id
we choose only names our reply topics.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from protocol.config_loader import ConfigError
from protocol.mqttlink import MqttLink, MqttSettings, Will, parse_broker_url

from .config import ControllerConfig


class CliIdentityError(ConfigError):
    """The CLI would connect under the controller's own identity (or its ``[cli]`` section is wrong)."""


def make_link(cfg: ControllerConfig, client_id: str, *, will: Will | None = None,
              subscriptions: list[tuple[str, int]] | None = None,
              on_connect: Callable[[], Any] | None = None, persistent: bool = False,
              settings: MqttSettings | None = None, manual_ack: bool = False) -> MqttLink:
    return MqttLink.from_settings(settings or cfg.mqtt, client_id, will=will, subscriptions=subscriptions,
                                  on_connect=on_connect, persistent=persistent, manual_ack=manual_ack)


def cli_settings(cfg: ControllerConfig) -> MqttSettings:
    """``[mqtt]`` with the CLI's own identity from ``[cli]``. On an anonymous broker (no certificate,
    no user: a lab or the demo) that is ``[mqtt]`` as it is; when ``[mqtt]`` authenticates as the
    controller and ``[cli]`` names no identity of its own, CliIdentityError says what to do."""
    m, c = cfg.mqtt, cfg.cli
    if c.cert_file or c.username:
        if c.cert_file and m.cert_file and c.cert_file == m.cert_file:
            raise CliIdentityError(f"cli.cert_file {c.cert_file} is the controller's certificate ([mqtt] cert_file): "
                                   "the CLI needs one of its own")
        if c.username and c.username == (m.username or parse_broker_url(m.broker).username):
            raise CliIdentityError(f"cli.username {c.username!r} is the controller's user: the CLI needs its own")
        try:
            return replace(m, cert_file=c.cert_file, key_file=c.key_file, username=c.username,
                           password_file=c.password_file)
        except ConfigError as exc:
            raise CliIdentityError(f"[cli]: {exc}") from None
    who = m.cert_file or m.username or parse_broker_url(m.broker).username
    if who:
        raise CliIdentityError(
            f"the CLI needs its own broker identity: [mqtt] in {cfg.source} authenticates as the controller "
            f"({who}), and the broker names each connection after its certificate or user "
            "(use_username_as_clientid), so this command would push `fleetctl serve` off the broker. "
            "Issue an operator certificate (fleetctl certs issue operator --dir pki; configs/mosquitto/acl has "
            "its `user operator` block) and set [cli] cert_file and key_file (password brokers: [cli] username "
            "and password_file)")
    return m
