"""The serial bridge: an MCU on a serial port becomes an input source and a sub-device.

A reader thread (pyserial) hands bytes to the asyncio loop; everything else runs on the loop.
SENSOR_FRAMEs go to ``on_sensor_frame`` through a bounded queue (policy ``drop_oldest`` or
``drop_newest``, counted), and its answer goes back as INFER_REPLY. HELLO (also after an MCU
reset) is acknowledged; RESULT/LOG/HEARTBEAT go to ``on_event`` as plain dicts. A port that
disappears (unplug) is reopened with jittered exponential backoff, and on every (re)open the
bridge sends its own HELLO so that an MCU which did not reset introduces itself again.
``push`` drives the sans-IO ``ModelPush`` (one transfer at a time) with the loop's clock.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
import logging
import random
import threading
import time
from typing import Any, Awaitable, Callable

from .frames import Message, MsgType
from .link import Link
from .push import ModelPush, PushResult, max_chunk_size

log = logging.getLogger("firmware_bridge")

MAX_PENDING_BYTES = 64 << 10  # bytes read from the port, not yet parsed on the loop (at most twice this)


@dataclass(frozen=True)
class BridgeConfig:
    port: str
    baud: int = 115200
    max_frame: int = 1024
    queue_size: int = 64
    policy: str = "drop_oldest"        # drop_oldest | drop_newest
    min_backoff_s: float = 0.2
    max_backoff_s: float = 10.0
    agent_id: str = "edge-agent"       # who we say we are in our HELLO

    def __post_init__(self) -> None:
        if self.policy not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"policy must be drop_oldest or drop_newest, got {self.policy!r}")
        if not (64 <= self.max_frame <= 65535):
            raise ValueError("max_frame must be 64..65535")
        if self.baud <= 0 or self.queue_size < 1:
            raise ValueError("baud and queue_size must be positive")


SensorHandler = Callable[[str, Message], "Awaitable[tuple[int, float] | None] | tuple[int, float] | None"]


class Bridge:
    def __init__(self, cfg: BridgeConfig, on_sensor_frame: SensorHandler,
                 on_event: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.cfg = cfg
        self.on_sensor_frame = on_sensor_frame
        self._on_event = on_event or (lambda e: None)
        self.link = Link(cfg.max_frame)
        self.mcu: dict[str, Any] | None = None
        self.queue: asyncio.Queue[Message] = asyncio.Queue(cfg.queue_size)
        self.counters = {"dropped_backpressure": 0, "replies": 0, "reopens": 0, "hellos": 0, "opens": 0,
                         "open_failures": 0, "pushes_ok": 0, "pushes_failed": 0, "read_pauses": 0,
                         "write_failures": 0, "handler_errors": 0, "dropped_stale": 0}
        self._serial: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._push: ModelPush | None = None
        self._push_wake = asyncio.Event()
        self._transfer_id = random.randrange(0x10000)
        self._session = 0                  # +1 at every HELLO: a reply never crosses an MCU restart
        self._pending_bytes = 0            # read by the thread, not yet parsed on the loop (capped)
        self._pending_lock = threading.Lock()

    def stats(self) -> dict[str, Any]:
        out = {**self.counters, "link": self.link.stats(), "mcu": self.mcu, "queued": self.queue.qsize(),
               "connected": self._serial is not None}
        if self._push is not None:
            out["push"] = self._push.progress()
        return out

    # -- serial side (thread) ------------------------------------------------
    def _open(self):
        import serial

        # write_timeout: an MCU that stops reading must not block the event loop for long
        return serial.Serial(self.cfg.port, self.cfg.baud, timeout=0.05, write_timeout=0.5)

    def _reader(self) -> None:
        import serial

        backoff = self.cfg.min_backoff_s
        told = False  # the first failed open of an outage is logged, the retries are only counted
        while not self._stop.is_set():
            try:
                if self._serial is None:
                    self._serial = self._open()
                    backoff, told = self.cfg.min_backoff_s, False
                    if self._loop:
                        self._loop.call_soon_threadsafe(self._on_open)
                s = self._serial
                with self._pending_lock:
                    behind = self._pending_bytes >= MAX_PENDING_BYTES
                if behind:
                    # The loop has not parsed what we gave it: stop reading, so the line's own buffer
                    # (and flow control, or the MCU) holds back. Reading on only to discard would also
                    # take the GIL from the loop, and the bridge would answer less the more it is sent.
                    self.counters["read_pauses"] += 1
                    self._stop.wait(0.002)
                    continue
                data = s.read(1)  # blocks up to the port timeout for the first byte, then takes what is there
                if data and s.in_waiting:
                    data += s.read(min(s.in_waiting, MAX_PENDING_BYTES))
                if data and self._loop:
                    with self._pending_lock:
                        self._pending_bytes += len(data)
                    self._loop.call_soon_threadsafe(self._feed, data)
            except (serial.SerialException, OSError) as exc:
                if self._serial is not None:
                    log.warning("serial port %s lost: %s", self.cfg.port, exc)
                    try:
                        self._serial.close()
                    except Exception:  # noqa: BLE001
                        pass
                    self._serial = None
                    self.counters["reopens"] += 1
                    if self._loop:
                        self._loop.call_soon_threadsafe(self._on_lost, str(exc))
                else:
                    self.counters["open_failures"] += 1
                    if not told:
                        log.warning("cannot open serial port %s: %s (retrying with backoff)", self.cfg.port, exc)
                        told = True
                self._stop.wait(backoff * random.uniform(0.5, 1.5))  # wakes at once on shutdown
                backoff = min(self.cfg.max_backoff_s, backoff * 2)

    def write(self, data: bytes) -> bool:
        s = self._serial
        if s is None:
            return False
        try:
            s.write(data)
            return True
        except Exception:  # noqa: BLE001 - a vanished port is handled by the reader; a stuck one times out
            self.counters["write_failures"] += 1
            return False

    # -- loop side -------------------------------------------------------------
    def _on_open(self) -> None:
        """A fresh port: whatever half-frame we held is stale; ask whoever is there to say HELLO."""
        self.counters["opens"] += 1
        self.link.reset_peer()
        self.write(self.link.send(MsgType.HELLO, {"device_id": self.cfg.agent_id[:64], "firmware": "bridge-1",
                                                  "max_frame": self.cfg.max_frame, "samples_per_frame": 0,
                                                  "sensors": []}))

    def _on_lost(self, reason: str) -> None:
        if self._push is not None:
            self._push.abort(time.monotonic(), "port_lost", f"serial port lost during the push: {reason}")
            self._push_wake.set()
        self.on_event({"event": "mcu.port_lost", "mcu": (self.mcu or {}).get("device_id"), "reason": reason})

    def on_event(self, event: dict[str, Any]) -> None:
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - the consumer's bug must not stop the link
            log.exception("bridge event handler failed on %s", event.get("event"))
            self.counters["handler_errors"] += 1

    def _send_all(self, out: list) -> None:
        for t, fields in out:
            self.write(self.link.send(t, fields))

    def _feed(self, data: bytes) -> None:
        with self._pending_lock:
            self._pending_bytes -= len(data)
        self.link.receive_data(data)
        for m in self.link.events():
            self._dispatch(m)

    def _dispatch(self, m: Message) -> None:
        if m.type == MsgType.HELLO:
            self.mcu = dict(m.fields)
            self.counters["hellos"] += 1
            self._session += 1
            while not self.queue.empty():  # frames of the MCU's previous session: their seqs mean nothing now
                self.queue.get_nowait()
                self.counters["dropped_stale"] += 1
            if self._push is not None:
                self._push.abort(time.monotonic(), "mcu_reset", "the MCU said HELLO (it restarted) during the push")
                self._push_wake.set()
            self.write(self.link.send(MsgType.HELLO_ACK, {"max_frame": min(self.cfg.max_frame, m.fields["max_frame"])}))
            self.on_event({"event": "mcu.hello", **self.mcu})
        elif m.type == MsgType.SENSOR_FRAME:
            if self.queue.full():
                self.counters["dropped_backpressure"] += 1
                if self.cfg.policy == "drop_newest":
                    return
                self.queue.get_nowait()
            self.queue.put_nowait(m)
        elif m.type in (MsgType.ACK, MsgType.NACK):
            if self._push is not None:
                self._send_all(self._push.receive(m, time.monotonic()))
                self._push_wake.set()
            else:
                self.link.dropped["unexpected_ack"] += 1
        elif m.type in (MsgType.RESULT, MsgType.LOG, MsgType.HEARTBEAT):
            self.on_event({"event": "mcu." + m.type.name.lower(), "mcu": (self.mcu or {}).get("device_id"),
                           **m.fields})

    async def push(self, blob: bytes, chunk_size: int | None = None, ack_timeout_s: float | None = None,
                   end_timeout_s: float = 5.0, retries: int = 5) -> PushResult:
        """Push ``blob`` to the MCU; returns when it ACKs/NACKs the whole transfer or we give up.

        Refused at once (a failed result, not an exception) with no MCU, or while another push runs.
        The default ACK timeout allows two frame times at the configured baud plus 0.25 s.
        """
        tid = self._transfer_id = (self._transfer_id + 1) & 0xFFFF
        limit = max_chunk_size(min(self.cfg.max_frame, int((self.mcu or {}).get("max_frame") or 0xFFFF)))
        size = min(chunk_size or 512, limit)
        if ack_timeout_s is None:
            ack_timeout_s = 0.25 + 2 * 10 * (size + 32) / self.cfg.baud
        p = ModelPush(blob, tid, size, ack_timeout_s, end_timeout_s, retries)
        if self.mcu is None or self._push is not None:
            why = ("no_mcu", "no MCU has said HELLO on this port") if self.mcu is None else \
                ("busy", "another push is running")
            self.counters["pushes_failed"] += 1
            return PushResult(False, why[0], why[1], tid, len(blob), p.n_chunks, 0, 0.0)
        self._push = p
        try:
            self._send_all(p.start(time.monotonic()))
            while not p.done:
                self._push_wake.clear()
                wait = max(0.0, (p.deadline or 0.0) - time.monotonic())
                try:
                    await asyncio.wait_for(self._push_wake.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                self._send_all(p.tick(time.monotonic()))
        finally:
            self._push = None
        assert p.result is not None
        self.counters["pushes_ok" if p.result.ok else "pushes_failed"] += 1
        return p.result

    async def run(self, stop: asyncio.Event) -> None:
        self._loop = asyncio.get_running_loop()
        t = threading.Thread(target=self._reader, name="serial-reader", daemon=True)
        t.start()
        worker = asyncio.create_task(self._serve(), name="bridge-frames")
        try:
            await stop.wait()
        finally:
            self._stop.set()
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
            t.join(2)
            if self._serial is not None:
                self._serial.close()

    async def _serve(self) -> None:
        while True:
            m = await self.queue.get()
            session = self._session
            try:
                res = self.on_sensor_frame((self.mcu or {}).get("device_id", "?"), m)
                if asyncio.iscoroutine(res):
                    res = await res
                if res is None:
                    continue
                if session != self._session:  # the MCU restarted meanwhile: that seq is someone else's now
                    self.counters["dropped_stale"] += 1
                    continue
                reply = self.link.send(MsgType.INFER_REPLY, {"ref_seq": m.seq, "label": int(res[0]),
                                                             "confidence": float(res[1])})
            except Exception:  # noqa: BLE001 - the handler's bug (or an answer the wire cannot carry): count it
                log.exception("sensor frame handler failed")
                self.counters["handler_errors"] += 1
                continue
            if self.write(reply):
                self.counters["replies"] += 1
