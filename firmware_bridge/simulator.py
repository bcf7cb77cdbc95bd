"""A reference MCU that speaks the link protocol over a pseudo-terminal (tests and bring-up).

It says HELLO (at boot, after a reset, and when the agent's HELLO asks who is there), streams
SENSOR_FRAMEs from real samples and HEARTBEATs (``send`` adds LOG/RESULT), takes a model push
(MODEL_BEGIN with a capacity check, per-chunk ACK/NACK, the blob CRC checked at MODEL_END) and
records the INFER_REPLYs it gets. Faults can be
injected on its transmit side (bit flips, garbage between frames, truncated frames), on its
receive side (bit flips: noise on the agent's frames), as NACKed chunks, resets (new HELLO,
sequence restart, transfer lost) and silence. ``detach``/``attach`` move it to another pty
(unplug/replug); while detached its bytes are lost, as on an unplugged cable.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import os
import random
import select
import threading
import time

from .frames import MsgType
from .link import Link
from .push import ModelReceiver


@dataclass
class Faults:
    bitflip: float = 0.0      # probability a frame gets one bit flipped
    garbage: float = 0.0      # probability of random bytes before a frame
    truncate: float = 0.0     # probability a frame is cut short
    reset_every: int = 0      # re-HELLO (MCU reset) every N frames (0: never)
    silence_s: float = 0.0    # pause after every 50 frames
    rx_bitflip: float = 0.0   # probability a read from the line gets one bit flipped (noise towards the MCU)
    nack_chunk: float = 0.0   # probability a good chunk is NACKed anyway (say, a flash write failed)
    seed: int = 0
    # faults that hit for certain, whatever the timing (tests that count on them), once per transfer:
    nack_chunks: frozenset = frozenset()       # these chunk indices are NACKed once
    corrupt_acks: frozenset = frozenset()      # the first ACK of these chunk indices gets a bit flipped
    rx_bitflip_reads: frozenset = frozenset()  # these reads after a MODEL_BEGIN (1 = the next one) get a bit flipped


@dataclass
class SimState:
    replies: list = field(default_factory=list)
    sent_frames: int = 0
    model: bytes = b""
    model_done: bool = False
    acks: int = 0
    nacks: int = 0
    hello_acks: int = 0
    hellos: int = 0
    hello_requests: int = 0
    begins: int = 0
    resets: int = 0
    tx_lost: int = 0


class MCUSimulator:
    def __init__(self, fd: int, device_id: str, samples, rate_hz: float = 200.0, faults: Faults | None = None,
                 max_frame: int = 1024, flash_bytes: int = 256 << 10, heartbeat_s: float = 1.0) -> None:
        self.fd: int | None = fd
        self.device_id = device_id
        self.samples = samples
        self.rate_hz = rate_hz
        self.heartbeat_s = heartbeat_s
        self.faults = faults or Faults()
        self.rng = random.Random(self.faults.seed)
        self.rx_rng = random.Random(self.faults.seed + 1)  # the rx thread's own: no sharing between threads
        self.link = Link(max_frame)
        self.state = SimState()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.receiver = ModelReceiver(flash_bytes, self._fail_chunk)
        self._done_once: set[tuple] = set()   # (fault, transfer id, chunk index) of the certain faults
        self._transfer_reads: int | None = None   # reads since a transfer began (rx_bitflip_reads)
        self._acked = False            # our last HELLO was answered
        self._hello_wanted = False     # the agent asked who we are
        self._reset_wanted = False
        self._tx_lock = threading.Lock()
        self.seq_to_sample: dict[int, int] = {}

    def _once(self, fault: str, chunks: frozenset, index: int) -> bool:
        key = (fault, (self.receiver.begin or {}).get("transfer_id"), index)
        if index not in chunks or key in self._done_once:
            return False
        self._done_once.add(key)
        return True

    def _fail_chunk(self, index: int) -> bool:
        return self._once("nack", self.faults.nack_chunks, index) or self.rx_rng.random() < self.faults.nack_chunk

    def send(self, t: MsgType, fields: dict, faulty: bool = False) -> None:
        """Send one message now (from any thread), e.g. a LOG or an on-MCU RESULT; by default
        spared the injected faults, so a test can count on it arriving."""
        self._send(t, fields, faulty)

    def reset(self) -> None:
        """Restart the MCU (from any thread): a transfer in progress is lost at once, HELLO follows."""
        self.receiver.reset()
        self._reset_wanted = True

    def detach(self) -> None:
        """Unplug: from now on our bytes go nowhere and we read nothing."""
        self.fd = None

    def attach(self, fd: int) -> None:
        """Replug on another pty; the MCU keeps running (no reset, sequence numbers go on)."""
        self.fd = fd

    def _send(self, t: MsgType, fields: dict, faulty: bool = True, sample: int | None = None,
              flip: bool = False) -> None:
        """Number, frame and write one message; both threads send, so this is one critical section
        (otherwise frames could leave in another order than their sequence numbers)."""
        with self._tx_lock:
            if sample is not None:
                self.seq_to_sample[self.link._tx_seq] = sample
            self._write(self.link.send(t, fields), faulty, flip)

    def _write(self, frame: bytes, faulty: bool = True, flip: bool = False) -> None:
        f = self.faults
        if faulty:
            garbage = b""
            if self.rng.random() < f.garbage:
                garbage = bytes(self.rng.randrange(1, 256) for _ in range(self.rng.randrange(1, 20)))
            if self.rng.random() < f.bitflip or flip:
                b = bytearray(frame)
                i = self.rng.randrange(1, len(b) - 1)
                b[i] ^= 1 << self.rng.randrange(8)
                frame = bytes(b)
            if self.rng.random() < f.truncate:
                frame = frame[:self.rng.randrange(1, len(frame) - 1)]
            frame = garbage + frame
        fd = self.fd
        try:
            if fd is None:
                raise OSError("detached")
            os.write(fd, frame)
        except OSError:
            self.state.tx_lost += 1    # unplugged (or the line's buffer is full): the bytes are gone

    def hello(self) -> None:
        with self._tx_lock:
            self.link = Link(self.link.max_frame)  # a reset restarts our sequence numbers
            self.seq_to_sample = {}
        self._acked = False
        self.state.hellos += 1
        self._send(MsgType.HELLO, {"device_id": self.device_id, "firmware": "sim-1.0",
                                   "max_frame": self.link.max_frame, "samples_per_frame": len(self.samples[0]),
                                   "sensors": ["digits8x8"]}, faulty=False)

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
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        t0 = beat = time.monotonic()
        while not self._stop.is_set():
            f = self.faults
            if self._reset_wanted or (f.reset_every and i and i % f.reset_every == 0):
                self._reset_wanted = False
                self.receiver.reset()
                self.state.resets += 1
                self.hello()
            elif self._hello_wanted or (not self._acked and i and i % 20 == 0):
                self._hello_wanted = False
                self.hello()  # asked by the agent, or an unanswered HELLO retried (nobody was listening)
            if f.silence_s and i and i % 50 == 0:
                time.sleep(f.silence_s)
            if self.heartbeat_s and time.monotonic() - beat >= self.heartbeat_s:
                beat = time.monotonic()
                self._send(MsgType.HEARTBEAT, {"uptime_s": int(beat - t0)})
            k = i % len(self.samples)
            self._send(MsgType.SENSOR_FRAME, {"timestamp_ms": i, "samples": [float(v) for v in self.samples[k]]},
                       sample=k)
            self.state.sent_frames += 1
            i += 1
            if period:
                time.sleep(period)

    def _rx(self) -> None:
        while not self._stop.is_set():
            fd = self.fd
            try:
                if fd is None:
                    raise OSError("detached")
                r, _, _ = select.select([fd], [], [], 0.05)
                if not r:
                    continue
                data = os.read(fd, 4096)
            except (OSError, ValueError):   # detached, closed, or no slave open (EIO): idle a moment
                time.sleep(0.02)
                continue
            if self._transfer_reads is not None:
                self._transfer_reads += 1
            if data and (self.rx_rng.random() < self.faults.rx_bitflip
                         or self._transfer_reads in self.faults.rx_bitflip_reads):
                b = bytearray(data)
                b[self.rx_rng.randrange(len(b))] ^= 1 << self.rx_rng.randrange(8)
                data = bytes(b)
            self.link.receive_data(data)
            for m in self.link.events():
                self._handle(m)

    def _handle(self, m) -> None:
        if m.type == MsgType.INFER_REPLY:
            lag = (self.link._tx_seq - 1 - m.fields["ref_seq"]) & 0xFFFF  # our frames sent since that one
            self.state.replies.append({**m.fields, "sample": self.seq_to_sample.get(m.fields["ref_seq"]), "lag": lag})
        elif m.type == MsgType.HELLO_ACK:
            self.state.hello_acks += 1
            self._acked = True
        elif m.type == MsgType.HELLO:
            self.state.hello_requests += 1
            self._hello_wanted = True
        elif m.type in (MsgType.MODEL_BEGIN, MsgType.MODEL_CHUNK, MsgType.MODEL_END):
            if m.type == MsgType.MODEL_BEGIN:
                self.state.begins += 1
                if (self.receiver.begin or {}).get("transfer_id") != m.fields["transfer_id"]:
                    self._transfer_reads = 0
            for t, fields in self.receiver.receive(m):
                if t == MsgType.ACK:
                    self.state.acks += 1
                else:
                    self.state.nacks += 1
                self._send(t, fields, flip=t == MsgType.ACK and self._once("ack", self.faults.corrupt_acks,
                                                                           fields["index"]))
            if self.receiver.blob is not None:
                self.state.model, self.state.model_done = self.receiver.blob, True
