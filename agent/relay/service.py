"""The relay role's wiring: two links, a router, the components, the relay's own state.

``edge-agent run`` with ``[relay] enabled = true`` runs this instead of the board's features:

* the **site link** (``[mqtt]``: the site broker) carries the relay's retained
  ``site/{site}/relay/state`` (``online``; its last will says ``offline``), which is how boards
  know whether to ask the relay or the centre;
* the **upstream link** (``[relay] upstream``: the central broker, over the site's uplink) is the
  relay's own connection as device ``{relay_id}``: its retained ``dev/{relay_id}/state`` says
  ``role = "relay"`` and the site (the registry records it; rollouts never target it), and it
  carries the relay's chunk pulls. Why its own connection rather than the bridge: the bridge's
  ``dev/+/bin`` rule would bring one site relay's chunks down to *every* site; a direct link
  keeps them on the one uplink that asked, and the counting proxy counts it as that site's.

Components (``RelayComponent``) get a ``RelayContext``; they subscribe through it, and the
router hands each message to the handler of every filter it matches. The federated component
(``agent/relay/fl.py``, sitefl19) is loaded when that module exists: it must define
``make_component(cfg: AgentConfig) -> RelayComponent``.
"""
from __future__ import annotations

import asyncio
from collections import Counter
import importlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message, MqttLink, Will, parse_broker_url
from protocol.sites import relay_state_topic, relay_status_topic
from protocol.topics import Topics

from . import MessageHandler, RelayComponent, RelayContext
from .cache import ChunkCache
from .chunks import ChunkRelay

if TYPE_CHECKING:  # pragma: no cover
    from ..core.config import AgentConfig

log = logging.getLogger("edge_agent.relay")


def topic_matches(flt: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest, including the parent)."""
    f, t = flt.split("/"), topic.split("/")
    for i, part in enumerate(f):
        if part == "#":
            return True
        if i >= len(t):
            return False
        if part != "+" and part != t[i]:
            return False
    return len(f) == len(t)


class Router:
    """Filter → handlers for one link; the link subscribes each filter (and again on reconnect)."""

    def __init__(self, link: MqttLink, log: logging.Logger) -> None:
        self.link = link
        self.log = log
        self.routes: list[tuple[str, MessageHandler]] = []

    def add(self, flt: str, handler: MessageHandler) -> None:
        self.routes.append((flt, handler))
        self.link.subscribe(flt, 1)

    async def run(self) -> None:
        q = self.link.messages
        while True:
            msg: Message = await q.get()
            for flt, handler in self.routes:
                if topic_matches(flt, msg.topic):
                    try:
                        await handler(msg)
                    except Exception:  # noqa: BLE001 - a component's bug must not stop the relay
                        self.log.exception("relay handler for %s failed on %s", flt, msg.topic)


class RelayService:
    def __init__(self, cfg: "AgentConfig") -> None:
        self.cfg = cfg
        rc = cfg.relay
        self.site_name = cfg.device.site
        self.relay_id = cfg.device.id
        self.topics = Topics(cfg.mqtt.topic_root)
        self.counters: Counter = Counter()
        self.status: dict[str, Any] = {}
        state = Path(cfg.state.dir)
        state.mkdir(parents=True, exist_ok=True)
        self.cache = ChunkCache(Path(rc.cache_dir) if rc.cache_dir else state / "relay-cache", rc.cache_bytes)
        self.components: list[RelayComponent] = []
        if "chunks" in rc.components:
            self.chunks = ChunkRelay(self.cache, rc.pull_window, rc.retry_s, cfg.mqtt.max_frame_bytes)
            self.components.append(self.chunks)
        if "fl" in rc.components:
            try:
                fl = importlib.import_module("agent.relay.fl")
            except ModuleNotFoundError as exc:
                if exc.name != "agent.relay.fl":
                    raise
                log.info("relay: no federated component (agent/relay/fl.py) installed")
            else:
                self.components.append(fl.make_component(cfg))
        self.site: MqttLink | None = None
        self.upstream: MqttLink | None = None

    def _state(self, status: str) -> bytes:
        body = {"status": status, "role": "relay", "site": self.site_name, "group": self.cfg.device.group,
                "relay": self.relay_id, "components": [c.name for c in self.components]}
        return encode(Envelope(kind="state", sender=self.relay_id, body=body))

    def _make_links(self) -> None:
        rs = relay_state_topic(self.topics.root, self.site_name)
        self.site = MqttLink.from_settings(
            self.cfg.mqtt, f"{self.relay_id}", will=lambda: Will(rs, self._state("offline"), 1, True),
            # a persistent session: while the relay is down (killed, restarting) the site broker
            # queues the boards' QoS 1 updates and chunk requests for it, instead of dropping them
            on_connect=self._on_site_connect, persistent=True)
        up = parse_broker_url(self.cfg.relay.upstream)
        m = self.cfg.mqtt
        upstream_tls = m.tls_files() if up.tls else None
        self.upstream = MqttLink(
            self.cfg.relay.upstream_client_id or f"{self.relay_id}", up, protocol=m.protocol,
            keepalive=m.keepalive, tls=upstream_tls, min_backoff=m.min_backoff_s, max_backoff=m.max_backoff_s,
            will=lambda: Will(self.topics.state(self.relay_id), self._state("offline"), 1, True),
            on_connect=self._on_upstream_connect, persistent=True)

    def _on_site_connect(self) -> None:
        assert self.site is not None
        self.site.publish(relay_state_topic(self.topics.root, self.site_name), self._state("online"), 1, True)

    def _on_upstream_connect(self) -> None:
        assert self.upstream is not None
        self.upstream.publish(self.topics.state(self.relay_id), self._state("online"), 1, True)
        if hasattr(self, "chunks"):
            self.chunks.on_upstream_connect()

    async def _status_loop(self) -> None:
        """The relay's figures, retained, up to the centre (and on the site) every few seconds."""
        while True:
            await asyncio.sleep(2.0)
            body = {"relay": self.relay_id, "site": self.site_name, "ts": time.time(),
                    "counters": dict(self.counters), **self.status}
            payload = json.dumps(body, separators=(",", ":"), default=str).encode()
            if self.site is not None:
                self.site.publish(relay_status_topic(self.topics.root, self.site_name), payload, 0, True)

    async def run(self, stop: asyncio.Event, ready: Any = None) -> None:
        self._make_links()
        assert self.site is not None and self.upstream is not None
        site_router, up_router = Router(self.site, log), Router(self.upstream, log)
        ctx = RelayContext(site_name=self.site_name, relay_id=self.relay_id, topics=self.topics, site=self.site,
                           upstream=self.upstream, state_dir=Path(self.cfg.state.dir), log=log,
                           counters=self.counters, on_site=site_router.add, on_upstream=up_router.add,
                           status=self.status)
        await self.site.start()
        await self.upstream.start()
        tasks = [asyncio.create_task(site_router.run(), name="relay-site-router"),
                 asyncio.create_task(up_router.run(), name="relay-upstream-router"),
                 asyncio.create_task(self._status_loop(), name="relay-status")]
        tasks += [asyncio.create_task(c.run(ctx), name=f"relay-{c.name}") for c in self.components]
        log.info("relay for site %s: site broker %s, upstream %s, components %s", self.site_name,
                 self.cfg.mqtt.broker, self.cfg.relay.upstream, [c.name for c in self.components])
        if ready:
            ready()
        try:
            await stop.wait()
        finally:
            for link, topic in ((self.site, relay_state_topic(self.topics.root, self.site_name)),
                                (self.upstream, self.topics.state(self.relay_id))):
                if link.connected.is_set():
                    await link.publish_and_wait(topic, self._state("offline"), 1, True, 1.0)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.site.stop()
            await self.upstream.stop()
