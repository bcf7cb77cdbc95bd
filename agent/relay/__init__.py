"""The site relay: an ``edge-agent`` role on a site's gateway (``[relay]`` in its config).

It holds two MQTT links — the site broker (its boards) and its own upstream connection to the
centre (through the site's uplink) — and hosts *components* on them. The chunk component
(``chunks.py``) pulls each patch's chunks once over the uplink into a bounded content-addressed
cache (``cache.py``) and serves the site's boards; sitefl19's federated component
(``fl.py``) pre-aggregates the site's updates. The relay holds no keys: boards check every
chunk against the hashes in the offer the controller signed.

Public API: ``RelayComponent`` (what a component implements), ``RelayContext`` (what it is
handed), ``RelayConfig`` (the ``[relay]`` section), ``RelayService`` (service.py).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    from protocol.mqttlink import Message, MqttLink
    from protocol.topics import Topics

__all__ = ["RelayComponent", "RelayContext", "RelayConfig", "MessageHandler"]

#: a component's handler for one subscribed topic filter (the raw message; it decodes it)
MessageHandler = Callable[["Message"], Awaitable[None]]


@dataclass
class RelayContext:
    """What a relay component is handed. ``site``/``upstream`` are running links (they reconnect by
    themselves); a component subscribes through ``on_site``/``on_upstream`` (the service routes each
    message to the handler of the filter it matched, and re-subscribes on reconnect)."""
    site_name: str
    relay_id: str                 # the relay's own device id at the centre (``dev/{relay_id}/…``)
    topics: "Topics"
    site: "MqttLink"              # the site broker (boards)
    upstream: "MqttLink"          # the centre (bytes here are the site's uplink)
    state_dir: Path               # this component may keep files under state_dir / its name
    log: logging.Logger
    counters: Counter = field(default_factory=Counter)
    #: filled by the service: ``on_site(filter, handler)`` / ``on_upstream(filter, handler)``
    on_site: Callable[[str, MessageHandler], None] = lambda flt, h: None
    on_upstream: Callable[[str, MessageHandler], None] = lambda flt, h: None
    #: extra fields for the relay's retained status (a component sets its own key)
    status: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class RelayComponent(Protocol):
    """One capability of the relay. ``name`` keys its counters/status; ``run`` subscribes what it
    needs (through ``ctx.on_site``/``ctx.on_upstream``) and then serves until cancelled."""
    name: str

    async def run(self, ctx: RelayContext) -> None: ...


@dataclass(frozen=True)
class RelayConfig:
    """``[relay]``: the gateway's role. ``upstream`` is the centre's broker URL (the relay's own
    connection over the uplink); the site broker is ``[mqtt] broker``."""
    enabled: bool = False
    upstream: str = ""
    upstream_client_id: str = ""      # default: the device id
    cache_bytes: int = 4 << 30        # bound of the chunk cache on disk (LRU by bytes beyond it)
    cache_dir: str = ""               # default: <state.dir>/relay-cache
    pull_window: int = 32             # chunks in flight upstream
    retry_s: float = 3.0
    components: tuple[str, ...] = ("chunks", "fl")   # which components run ("fl" when agent/relay/fl.py exists)

    def __post_init__(self) -> None:
        from protocol.config_loader import ConfigError, check
        from protocol.mqttlink import BrokerUrlError, parse_broker_url

        if self.enabled:
            check(bool(self.upstream), "relay.upstream", "is required when relay.enabled = true "
                  "(the centre's broker, e.g. mqtts://centre.example:8883)")
            try:
                parse_broker_url(self.upstream)
            except BrokerUrlError as exc:
                raise ConfigError(f"relay.upstream: {exc}") from None
        check(1 << 20 <= self.cache_bytes <= 1 << 42, "relay.cache_bytes", "must be 1 MiB..4 TiB")
        check(1 <= self.pull_window <= 64, "relay.pull_window", f"must be 1..64, got {self.pull_window}")
        check(0.1 <= self.retry_s <= 600, "relay.retry_s", "must be 0.1..600 s")
        for c in self.components:
            check(c in ("chunks", "fl"), "relay.components", f"unknown component {c!r} (chunks, fl)")
