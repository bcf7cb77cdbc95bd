"""A reference MCU that speaks the link protocol over a pseudo-terminal (tests and bring-up).

It says HELLO, streams SENSOR_FRAMEs from real samples, answers MODEL_* with per-chunk ACK/NACK
(checking each chunk's CRC) and records the INFER_REPLYs it gets. Faults can be injected:
bit flips, garbage between frames, truncated frames, resets (new HELLO, sequence restart),
silence.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import os
import random
import select
import threading
import time
import zlib

from .frames import MsgType
from .link import Link


@dataclass
class Faults:
    bitflip: float = 0.0      # probability a frame gets one bit flipped
    garbage: float = 0.0      # probability of random bytes before a frame
    truncate: float = 0.0     # probability a frame is cut short
    reset_every: int = 0      # re-HELLO (MCU reset) every N frames (0: never)
    silence_s: float = 0.0    # pause after every 50 frames
    seed: int = 0


@dataclass
class SimState:
    replies: list = field(default_factory=list)
    sent_frames: int = 0
    model: bytes = b""
    model_done: bool = False
    acks: int = 0
    nacks: int = 0
    hello_acks: int = 0


class MCUSimulator:
    def __init__(self, fd: int, device_id: str, samples, rate_hz: float = 200.0, faults: Faults | None = None,
                 max_frame: int = 1024) -> None:
        self.fd = fd
        self.device_id = device_id
        self.samples = samples
        self.rate_hz = rate_hz
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)
        self.link = Link(max_frame)
        self.state = SimState()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._chunks: dict[int, bytes] = {}
        self._begin: dict | None = None

    def _write(self, frame: bytes, faulty: bool = True) -> None:
        f = self.faults
        if faulty:
            if self.rng.random() < f.garbage:
                os.write(self.fd, bytes(self.rng.randrange(1, 256) for _ in range(self.rng.randrange(1, 20))))
            if self.rng.random() < f.bitflip:
                b = bytearray(frame)
                i = self.rng.randrange(1, len(b) - 1)
                b[i] ^= 1 << self.rng.randrange(8)
                frame = bytes(b)
            if self.rng.random() < f.truncate:
                frame = frame[:self.rng.randrange(1, len(frame) - 1)]
        os.write(self.fd, frame)

    def hello(self) -> None:
        self.link = Link(self.link.max_frame)  # a reset restarts our sequence numbers
        self.seq_to_sample: dict[int, int] = {}
        self._write(self.link.send(MsgType.HELLO, {"device_id": self.device_id, "firmware": "sim-1.0",
                                                    "max_frame": self.link.max_frame,
                                                    "samples_per_frame": len(self.samples[0]),
                                                    "sensors": ["digits8x8"]}), faulty=False)

    def start(self) -> "MCUSimulator":
        for target in (self._tx, self._rx):
            t = threading.Thread(target=target, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(2)

    def _tx(self) -> None:
        self.hello()
        i = 0
        period = 1.0 / self.rate_hz
        while not self._stop.is_set():
            f = self.faults
            if (f.reset_every and i and i % f.reset_every == 0) or (not self.state.hello_acks and i and i % 20 == 0):
                self.hello()  # a reset, or an unanswered HELLO retried (the bridge may not have been listening)
            if f.silence_s and i and i % 50 == 0:
                time.sleep(f.silence_s)
            s = self.samples[i % len(self.samples)]
            self.seq_to_sample[self.link._tx_seq] = i % len(self.samples)
            self._write(self.link.send(MsgType.SENSOR_FRAME, {"timestamp_ms": i, "samples": [float(v) for v in s]}))
            self.state.sent_frames += 1
            i += 1
            time.sleep(period)

    def _rx(self) -> None:
        while not self._stop.is_set():
            r, _, _ = select.select([self.fd], [], [], 0.05)
            if not r:
                continue
            try:
                data = os.read(self.fd, 4096)
            except OSError:
                return
            self.link.receive_data(data)
            for m in self.link.events():
                self._handle(m)

    def _handle(self, m) -> None:
        if m.type == MsgType.INFER_REPLY:
            self.state.replies.append({**m.fields, "sample": self.seq_to_sample.get(m.fields["ref_seq"])})
        elif m.type == MsgType.HELLO_ACK:
            self.state.hello_acks += 1
        elif m.type == MsgType.MODEL_BEGIN:
            self._begin, self._chunks = m.fields, {}
        elif m.type == MsgType.MODEL_CHUNK and self._begin:
            self._chunks[m.fields["index"]] = m.fields["data"]
            self._write(self.link.send(MsgType.ACK, {"transfer_id": m.fields["transfer_id"],
                                                     "index": m.fields["index"]}))
        elif m.type == MsgType.MODEL_END and self._begin:
            n = m.fields["chunks"]
            blob = b"".join(self._chunks.get(i, b"") for i in range(n))
            ok = len(self._chunks) == n and zlib.crc32(blob) == self._begin["crc32"]
            t = MsgType.ACK if ok else MsgType.NACK
            fields = {"transfer_id": m.fields["transfer_id"], "index": 0xFFFF}
            if not ok:
                fields["reason"] = 2
            self._write(self.link.send(t, fields), faulty=False)
            if ok:
                self.state.model, self.state.model_done = blob, True
