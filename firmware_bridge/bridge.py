"""The serial bridge: an MCU on a serial port becomes an input source and a sub-device.

A reader thread (pyserial) hands bytes to the asyncio loop; everything else runs on the loop.
SENSOR_FRAMEs go to ``on_sensor_frame`` through a bounded queue (policy ``drop_oldest`` or
``drop_newest``, counted), and its answer goes back as INFER_REPLY. HELLO (also after an MCU
reset) is acknowledged; RESULT/LOG/HEARTBEAT go to ``on_event`` as plain dicts. A port that
disappears (unplug) is reopened with jittered exponential backoff.
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

log = logging.getLogger("firmware_bridge")


@dataclass(frozen=True)
class BridgeConfig:
    port: str
    baud: int = 115200
    max_frame: int = 1024
    queue_size: int = 64
    policy: str = "drop_oldest"        # drop_oldest | drop_newest
    min_backoff_s: float = 0.2
    max_backoff_s: float = 10.0

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
        self.on_event = on_event or (lambda e: None)
        self.link = Link(cfg.max_frame)
        self.mcu: dict[str, Any] | None = None
        self.queue: asyncio.Queue[Message] = asyncio.Queue(cfg.queue_size)
        self.counters = {"dropped_backpressure": 0, "replies": 0, "reopens": 0, "hellos": 0}
        self._serial: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "link": self.link.stats(), "mcu": self.mcu, "queued": self.queue.qsize()}

    # -- serial side (thread) ------------------------------------------------
    def _open(self):
        import serial

        return serial.Serial(self.cfg.port, self.cfg.baud, timeout=0.05)

    def _reader(self) -> None:
        import serial

        backoff = self.cfg.min_backoff_s
        while not self._stop.is_set():
            try:
                if self._serial is None:
                    self._serial = self._open()
                    backoff = self.cfg.min_backoff_s
                data = self._serial.read(4096)
                if data and self._loop:
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
                time.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(self.cfg.max_backoff_s, backoff * 2)

    def write(self, data: bytes) -> bool:
        s = self._serial
        if s is None:
            return False
        try:
            s.write(data)
            return True
        except Exception:  # noqa: BLE001 - a vanished port is handled by the reader
            return False

    # -- loop side -------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self.link.receive_data(data)
        for m in self.link.events():
            self._dispatch(m)

    def _dispatch(self, m: Message) -> None:
        if m.type == MsgType.HELLO:
            self.mcu = dict(m.fields)
            self.counters["hellos"] += 1
            self.write(self.link.send(MsgType.HELLO_ACK, {"max_frame": min(self.cfg.max_frame, m.fields["max_frame"])}))
            self.on_event({"event": "mcu.hello", **self.mcu})
        elif m.type == MsgType.SENSOR_FRAME:
            if self.queue.full():
                self.counters["dropped_backpressure"] += 1
                if self.cfg.policy == "drop_newest":
                    return
                self.queue.get_nowait()
            self.queue.put_nowait(m)
        elif m.type in (MsgType.RESULT, MsgType.LOG, MsgType.HEARTBEAT):
            self.on_event({"event": "mcu." + m.type.name.lower(), "mcu": (self.mcu or {}).get("device_id"),
                           **m.fields})

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
            res = self.on_sensor_frame((self.mcu or {}).get("device_id", "?"), m)
            if asyncio.iscoroutine(res):
                res = await res
            if res is not None:
                label, conf = res
                if self.write(self.link.send(MsgType.INFER_REPLY, {"ref_seq": m.seq, "label": int(label),
                                                                   "confidence": float(conf)})):
                    self.counters["replies"] += 1
