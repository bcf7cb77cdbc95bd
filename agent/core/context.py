"""The port every agent feature is handed, and the shape of a feature.

The daemon (``agent.app``) owns the lifecycle and the MQTT link; a capability (serving,
offload, updates, learning, the MCU bridge) is a ``Feature``: it receives an ``AgentContext``
— publish, reply, events, counters, config — and *declares* what it needs: commands, message
kinds on the controller channel or the request topic, subscriptions of its own, telemetry,
state fields, background tasks and Home Assistant discovery messages. The app composes a list
of features and routes by what they declared; features never import the app, and reach a
sibling only through what they were handed at construction.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, Union

from protocol.binary import Frame
from protocol.envelope import Envelope
from protocol.mqttlink import Message

if TYPE_CHECKING:  # pragma: no cover
    from protocol.topics import Topics

    from .config import AgentConfig
    from .counters import Counters


class CommandError(Exception):
    """A command that cannot be carried out; the message goes back in the reply."""


#: a command: (args, envelope) -> result dict (or an awaitable of one); raise CommandError to refuse
CommandHandler = Callable[[dict[str, Any], Envelope], "Awaitable[dict[str, Any]] | dict[str, Any]"]
#: a message kind: (envelope, or the frame when the payload was a binary frame; the MQTT message)
KindHandler = Callable[[Union[Envelope, Frame], Message], Awaitable[None]]


@dataclass(frozen=True)
class Subscription:
    """A topic a feature consumes itself; ``handler`` gets the raw message (it decodes it)."""
    topic: str
    qos: int
    handler: Callable[[Message], Awaitable[None]]


class AgentContext(Protocol):
    """What a feature may use of the running agent."""

    device_id: str
    cfg: "AgentConfig"
    topics: "Topics"
    counters: "Counters"

    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, **props: Any) -> bool: ...

    def publish_reliable(self, kind: str, topic: str, payload: bytes, qos: int = 1,
                         retain: bool = False) -> bool: ...

    def reply(self, request: Envelope, msg: Message | None, body: dict[str, Any]) -> bool: ...

    def emit_event(self, event: str, level: str = "info", **data: Any) -> bool: ...

    def republish_state(self) -> None: ...

    def announce_discovery(self) -> None:
        """(Re)announce HA discovery for the board and every feature's sub-devices; clear what is
        no longer offered."""
        ...

    def decode(self, msg: Message) -> "tuple[Envelope, Frame | None] | None":
        """Validate a raw message: (envelope, frame or None), or None once counted and logged."""


class Feature:
    """Base class: a feature overrides only what it declares. Declarations are read after
    ``start()``, so a feature may declare less when it found nothing to serve (no head to train)."""

    #: telemetry section name (``telemetry()`` lands under it)
    name: str = ""

    def start(self) -> None:
        """Synchronous start-up before the link opens (open stores, restore state)."""

    def commands(self) -> dict[str, CommandHandler]:
        return {}

    def control_kinds(self) -> dict[str, KindHandler]:
        """Kinds taken on the controller channel (device and group cmd topics; signed when required)."""
        return {}

    def request_kinds(self) -> dict[str, KindHandler]:
        """Kinds taken on the device's request topic (any authorised client); run beside the loop."""
        return {}

    def subscriptions(self) -> list[Subscription]:
        return []

    def telemetry(self) -> dict[str, Any] | None:
        return None

    def state_fields(self) -> dict[str, Any]:
        """Fields merged into the retained ``online`` state."""
        return {}

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        """Background coroutines (named), started once the link is up, cancelled at shutdown."""
        return []

    def discovery(self) -> list[tuple[str, bytes]]:
        """Extra Home Assistant discovery messages (sub-devices), announced with the board's own."""
        return []

    async def on_connect(self) -> None:
        """Called on every (re)connect, after state and discovery are published."""
