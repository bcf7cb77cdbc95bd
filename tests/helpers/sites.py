"""A central Mosquitto and N site Mosquittos bridged to it with ``protocol.sites.bridge_config``.

Each site's uplink (its bridge, and a relay's own upstream connection) can go through a
``CountingProxy``: a TCP proxy on a free loopback port, an asyncio loop in a thread, that counts
the bytes and the whole MQTT packets (PUBLISH among them) crossing each way. ``cut()`` drops
every connection and refuses new ones (the uplink is down) until ``restore()``.

    tier = SiteTier(tmp_path, ["farm-1", "farm-2"]).start()
    tier.sites["farm-1"].url          # where the site's boards connect
    tier.sites["farm-1"].uplink_url   # where the site's relay connects upstream (counted)
    tier.sites["farm-1"].proxy.down   # bytes centre -> site so far
    tier.stop()
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
import threading
from pathlib import Path

from protocol.sites import BridgeSettings, bridge_config, bridge_topic

from .broker import Mosquitto, free_port
from .waiting import Probe


class MqttPacketCounter:
    """Counts whole MQTT control packets in one direction of a byte stream (sans-IO: feed bytes)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.packets = 0
        self.publishes = 0
        self.publish_bytes = 0     # whole PUBLISH packets, headers included

    def feed(self, data: bytes) -> None:
        self._buf += data
        while True:
            n = len(self._buf)
            if n < 2:
                return
            length, mult, i = 0, 1, 1
            while True:
                if i >= n:
                    return
                b = self._buf[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
                if i > 4:
                    raise ValueError("malformed MQTT remaining length")
            total = i + length
            if n < total:
                return
            if self._buf[0] >> 4 == 3:
                self.publishes += 1
                self.publish_bytes += total
            self.packets += 1
            del self._buf[:total]


class CountingProxy:
    """TCP proxy 127.0.0.1:port -> 127.0.0.1:target, counting bytes and MQTT packets each way."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self.up = 0      # client -> target (site -> centre)
        self.down = 0    # target -> client (centre -> site)
        self._counters: list[tuple[MqttPacketCounter, MqttPacketCounter]] = []   # per connection: up, down
        self.connections = 0
        self._lock = threading.Lock()
        self._cut = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"proxy-{self.port}", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "CountingProxy":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.close()
            return
        try:
            treader, twriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._writers |= {writer, twriter}
        # one packet counter per direction per connection (MQTT connections start and end on packet
        # boundaries, so every count is of whole packets)
        up_c, down_c = MqttPacketCounter(), MqttPacketCounter()
        with self._lock:
            self._counters.append((up_c, down_c))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    with self._lock:
                        if up:
                            self.up += len(data)
                            up_c.feed(data)
                        else:
                            self.down += len(data)
                            down_c.feed(data)
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError, ValueError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, twriter, True), pump(treader, writer, False))
        self._writers -= {writer, twriter}

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"up": self.up, "down": self.down,
                    "up_publishes": sum(u.publishes for u, _ in self._counters),
                    "down_publishes": sum(d.publishes for _, d in self._counters),
                    "up_publish_bytes": sum(u.publish_bytes for u, _ in self._counters),
                    "down_publish_bytes": sum(d.publish_bytes for _, d in self._counters)}

    def cut(self) -> None:
        """The uplink goes down: every connection drops, new ones are refused."""
        def _cut() -> None:
            self._cut = True
            for w in list(self._writers):
                w.transport.abort()
        self._loop.call_soon_threadsafe(_cut)

    def restore(self) -> None:
        self._loop.call_soon_threadsafe(setattr, self, "_cut", False)

    def stop(self) -> None:
        async def _close() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.transport.abort()
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


@dataclass
class Site:
    name: str
    broker: Mosquitto
    proxy: CountingProxy | None
    centre_port: int
    config: str = ""

    @property
    def url(self) -> str:
        """Where the site's boards (and the relay's site link) connect."""
        return self.broker.url

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def uplink_url(self) -> str:
        """The centre as seen from the site: through the counting proxy when there is one."""
        return self.proxy.url if self.proxy is not None else f"mqtt://127.0.0.1:{self.centre_port}"


@dataclass
class SiteTier:
    workdir: Path
    site_names: list[str]
    counted: bool = True
    root: str = "edgefleet"
    restart_timeout: tuple[int, int] = (1, 2)
    #: site -> its boards: the bridge's downlink names each board (BridgeSettings.boards)
    boards: dict[str, list[str]] = field(default_factory=dict)
    centre: Mosquitto | None = None
    sites: dict[str, Site] = field(default_factory=dict)

    def start(self, timeout: float = 30.0) -> "SiteTier":
        cdir = self.workdir / "centre"
        cdir.mkdir(parents=True, exist_ok=True)
        self.centre = Mosquitto(cdir, persistence=False).start()
        for name in self.site_names:
            self.add_site(name)
        self.wait_bridged(timeout=timeout)
        return self

    def add_site(self, name: str) -> Site:
        assert self.centre is not None
        proxy = CountingProxy(self.centre.port).start() if self.counted else None
        centre = f"127.0.0.1:{proxy.port if proxy else self.centre.port}"
        conf = bridge_config(BridgeSettings(site=name, centre=centre, root=self.root, keepalive_s=5,
                                            restart_timeout=self.restart_timeout,
                                            boards=tuple(self.boards.get(name, ()))))
        sdir = self.workdir / f"site-{name}"
        sdir.mkdir(parents=True, exist_ok=True)
        broker = Mosquitto(sdir, extra_conf=conf).start()
        site = Site(name, broker, proxy, self.centre.port, conf)
        self.sites[name] = site
        return site

    def bridged(self) -> dict[str, bool]:
        """Each site's bridge state as the centre sees its retained notification (1 = connected)."""
        assert self.centre is not None
        topics = tuple(bridge_topic(self.root, n) for n in self.sites)
        probe = Probe(self.centre.port, subscribe=topics, protocol="3.1.1").wait_subscribed()
        try:
            try:
                probe.wait(lambda t, p: True, n=len(topics), timeout=2)
            except AssertionError:
                pass
            last = {t: p for t, p, _ in probe.seen()}
        finally:
            probe.close()
        return {n: last.get(bridge_topic(self.root, n)) == b"1" for n in self.sites}

    def wait_bridged(self, names: list[str] | None = None, timeout: float = 30.0) -> None:
        """Block until the named sites' bridges are up at the centre (each a retained ``1``)."""
        assert self.centre is not None
        want = {bridge_topic(self.root, n) for n in (names or list(self.sites))}
        probe = Probe(self.centre.port, subscribe=tuple(want), protocol="3.1.1")
        try:
            def up() -> bool:
                last: dict[str, bytes] = {}
                for t, p, _ in probe.seen():
                    last[t] = p
                return all(last.get(t) == b"1" for t in want)
            with probe._cond:
                import time as _t
                deadline = _t.monotonic() + timeout
                while not up():
                    left = deadline - _t.monotonic()
                    if left <= 0:
                        raise AssertionError(f"site bridges {sorted(want)} not up after {timeout}s")
                    probe._cond.wait(left)
        finally:
            probe.close()

    def counts(self) -> dict[str, dict[str, int]]:
        return {n: s.proxy.snapshot() for n, s in self.sites.items() if s.proxy is not None}

    def stop(self) -> None:
        for s in self.sites.values():
            s.broker.stop()
            if s.proxy is not None:
                s.proxy.stop()
        if self.centre is not None:
            self.centre.stop()
