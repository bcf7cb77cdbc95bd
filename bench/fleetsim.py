"""A fleet of simulated boards in one process: raw MQTT 5 over asyncio sockets.

Why raw sockets and not paho: ten thousand paho clients means ten thousand network threads (or a
hand-rolled select loop over paho's internals); one asyncio loop with a tiny MQTT 5 encoder opens
10,000 real TCP connections in seconds and costs a few µs per message. Each simulated board
speaks the device contract as ``edge-agent run`` does (protocol/topics.py, agent/app.py):

* CONNECT (MQTT 5, clean start) with a last will: retained QoS 1 ``state`` ``{"status": "offline"}``;
* on CONNACK, a retained QoS 1 ``state`` ``{"status": "online", ...}`` (the agent's state body);
* telemetry at QoS 1 on ``…/dev/<id>/telemetry``: an envelope with a fresh message id and ``ts``,
  whose body is a real agent's telemetry (captured from ``edge-agent run`` with serving, learning,
  offload and update features: ``bench/data/agent_telemetry.json``), with the counters moving.

"Sent" means the broker's PUBACK came back; those are the messages the controller must ingest.
"""
from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "data" / "agent_telemetry.json"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n % 128, n // 128
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _s(b: bytes) -> bytes:
    return struct.pack("!H", len(b)) + b


def connect_packet(client_id: str, will_topic: str, will_payload: bytes, keepalive: int = 60) -> bytes:
    flags = 0x02 | 0x04 | 0x08 | 0x20          # clean start, will, will QoS 1, will retain
    var = b"\x00\x04MQTT\x05" + bytes([flags]) + struct.pack("!H", keepalive) + b"\x00"
    payload = _s(client_id.encode()) + b"\x00" + _s(will_topic.encode()) + _s(will_payload)
    body = var + payload
    return b"\x10" + _varint(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, pid: int, retain: bool = False) -> bytes:
    body = _s(topic) + struct.pack("!H", pid) + b"\x00" + payload
    return bytes([0x32 | (1 if retain else 0)]) + _varint(len(body)) + body


DISCONNECT = b"\xe0\x00"


def envelope(kind: str, sender: str, body: dict[str, Any], ts: float | None = None) -> tuple[str, bytes]:
    """The envelope bytes as protocol/envelope.encode writes them (compact JSON), and its id."""
    mid = os.urandom(16).hex()
    d = {"schema": 1, "kind": kind, "id": mid, "sender": sender, "ts": round(time.time() if ts is None else ts, 6),
         "body": body}
    return mid, json.dumps(d, separators=(",", ":")).encode()


def telemetry_template() -> dict[str, Any]:
    return json.loads(DATA.read_text())


def telemetry_body(template: dict[str, Any], seq: int, interval_s: float) -> dict[str, Any]:
    """The agent's body with what moves between two samples moved (seq, uptime, counters)."""
    b = dict(template)
    b["seq"] = seq
    b["interval_s"] = interval_s
    b["agent_uptime_s"] = round(seq * interval_s, 1)
    b["cpu_percent"] = float((seq * 37) % 100)
    msgs = dict(b["msgs"])
    msgs["tx"] = {**msgs["tx"], "telemetry": seq}
    b["msgs"] = msgs
    return b


def state_online(device_id: str) -> dict[str, Any]:
    return {"status": "online", "group": "sim", "versions": {"agent": "0.1.0", "protocol": 1},
            "capabilities": {"runtimes": ["onnxruntime"], "cores": 4, "memory_mb": 3906, "arch": "aarch64",
                             "os": "Linux 6.6.31+rpt-rpi-v8", "python": "3.11.2"},
            "model": {"name": "kws", "version": "1.4.0"}}


class _Board(asyncio.Protocol):
    """One connection: send bytes, count PUBACKs, notice CONNACK; no reading of anything else."""

    def __init__(self, fleet: "Fleet", dev: str) -> None:
        self.fleet = fleet
        self.dev = dev
        self.transport: asyncio.Transport | None = None
        self.connack = fleet.loop.create_future()
        self.buf = bytearray()
        self.pid = 0
        self.pending: set[int] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while len(buf) >= 2:
            mult, n, i = 1, 0, 1
            while True:
                if i >= len(buf):
                    return
                b = buf[i]
                n += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            if len(buf) < i + n:
                return
            ptype = buf[0] >> 4
            if ptype == 4:                         # PUBACK
                pid = (buf[i] << 8) | buf[i + 1]
                if pid in self.pending:
                    self.pending.discard(pid)
                    self.fleet.acked += 1
            elif ptype == 2 and not self.connack.done():
                self.connack.set_result(buf[i + 1])  # reason code
            del buf[:i + n]

    def connection_lost(self, exc: Exception | None) -> None:
        self.fleet.lost += 1
        if not self.connack.done():
            self.connack.set_result(-1)

    def publish(self, topic: bytes, payload: bytes, retain: bool = False) -> None:
        self.pid = self.pid % 65535 + 1
        self.pending.add(self.pid)
        assert self.transport is not None
        self.transport.write(publish_packet(topic, payload, self.pid, retain))


@dataclass
class Fleet:
    """``n`` boards ``sim-00000``… on ``host:port`` under ``root``."""

    host: str
    port: int
    n: int
    root: str = "edgefleet"
    prefix: str = "sim"
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_event_loop)
    boards: list[_Board] = field(default_factory=list)
    acked: int = 0
    sent: int = 0
    lost: int = 0

    def dev(self, i: int) -> str:
        return f"{self.prefix}-{i:05d}"

    def topic(self, dev: str, leaf: str) -> bytes:
        return f"{self.root}/v1/dev/{dev}/{leaf}".encode()

    async def connect(self, parallel: int = 200) -> float:
        """Open every connection (``parallel`` handshakes at a time); each publishes its retained
        online state on CONNACK, as the agent does. Returns the seconds it took."""
        t0 = time.perf_counter()
        sem = asyncio.Semaphore(parallel)

        async def one(i: int) -> None:
            dev = self.dev(i)
            async with sem:
                for attempt in range(20):
                    _, board = await self.loop.create_connection(lambda: _Board(self, dev), self.host, self.port)
                    _, will = envelope("state", dev, {"status": "offline", "group": "sim"})
                    board.transport.write(connect_packet(dev, self.topic(dev, "state").decode(), will))
                    rc = await board.connack
                    if rc == 0:
                        break
                    board.transport.close()
                    await asyncio.sleep(0.05 * (attempt + 1))
                else:
                    raise RuntimeError(f"{dev}: broker refused the connection")
                self.boards.append(board)
                _, st = envelope("state", dev, state_online(dev))
                board.publish(self.topic(dev, "state"), st, retain=True)
                self.sent += 1

        await asyncio.gather(*(one(i) for i in range(self.n)))
        self.boards.sort(key=lambda b: b.dev)
        return time.perf_counter() - t0

    async def telemetry(self, interval_s: float, duration_s: float, template: dict[str, Any],
                        sent_log: list[tuple[float, str]] | None = None) -> tuple[float, float]:
        """Every board sends telemetry every ``interval_s`` for ``duration_s``, phases spread evenly
        (board j at t0 + j*interval/n, the steady state of boards that started at random times).
        Returns (t0, t_end) wall times."""
        n = len(self.boards)
        step = interval_s / n
        t0 = time.time()
        total = int(duration_s / interval_s) * n
        seqs = [0] * n
        j = 0
        while j < total:
            now = time.time()
            due = min(total, int((now - t0) / step) + 1)
            while j < due:
                k = j % n
                b = self.boards[k]
                seqs[k] += 1
                mid, payload = envelope("telemetry", b.dev, telemetry_body(template, seqs[k], interval_s))
                b.publish(self.topic(b.dev, "telemetry"), payload)
                self.sent += 1
                if sent_log is not None:
                    sent_log.append((now, mid))
                j += 1
            await asyncio.sleep(min(0.005, max(0.0, t0 + j * step - time.time())))
        return t0, time.time()

    async def burst(self, count: int, template: dict[str, Any], window: int = 2000) -> float:
        """Send ``count`` telemetry messages as fast as the broker acknowledges them (at most
        ``window`` unacknowledged). Returns the seconds it took until the last PUBACK."""
        t0 = time.perf_counter()
        base = self.acked
        n = len(self.boards)
        for j in range(count):
            while self.sent - self.acked > window:
                await asyncio.sleep(0.002)
            b = self.boards[j % n]
            _, payload = envelope("telemetry", b.dev, telemetry_body(template, 100000 + j, 10.0))
            b.publish(self.topic(b.dev, "telemetry"), payload)
            self.sent += 1
            if j % 200 == 0:
                await asyncio.sleep(0)
        await self.wait_acked(base + count, 60)
        return time.perf_counter() - t0

    async def wait_acked(self, target: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.acked < target and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.acked >= target

    def unacked(self) -> int:
        return sum(len(b.pending) for b in self.boards)

    async def close(self) -> None:
        for b in self.boards:
            if b.transport is not None and not b.transport.is_closing():
                b.transport.write(DISCONNECT)
                b.transport.close()
        await asyncio.sleep(0.1)
