"""Agent-side model push as a sans-IO state machine: ACK/NACK messages and time in, messages out.

Stop-and-wait, one chunk in flight: an MCU usually has one frame buffer and writes each chunk
to flash before it can take the next, so the per-chunk ACK *is* the flow control and nothing
has to be negotiated. The object never touches a port or a clock: the driver (``Bridge.push``)
passes ``now`` in, calls ``tick(now)`` at ``deadline``, and writes what comes back.

Rules (the whole machine)::

    state    input                                    -> output, next state
    -------  ---------------------------------------  --------------------------------------------
    IDLE     start(now)                               -> BEGIN + chunk 0, SENDING (END if 0 chunks)
    SENDING  ACK(tid, index == current)               -> next chunk; after the last: END, ENDING
    SENDING  ACK/NACK(tid, other chunk index)         -> nothing (stale answer to a resend), counted
    SENDING  NACK(tid, current, chunk_crc or unknown) -> resend the chunk now, SENDING
    SENDING  NACK(tid, 0xFFFF or no_space)            -> FAILED (the MCU gave up)
    SENDING  tick(now >= deadline)                    -> resend the chunk (+ BEGIN while none was ACKed)
    ENDING   ACK(tid, 0xFFFF)                         -> DONE
    ENDING   NACK(tid, 0xFFFF, reason)                -> FAILED(reason)
    ENDING   tick(now >= deadline)                    -> resend END
    live     a step resent more than ``retries`` times -> FAILED(timeout | too_many_nacks)
    live     abort(reason) (MCU reset, port lost)     -> FAILED(reason)
    DONE/FAILED anything                              -> nothing (terminal states are sticky)

ACK/NACK of another transfer id are ignored and counted. Misusing the object (start twice,
input before start) is our bug and raises ``PushUsageError``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
import zlib
from typing import Any, Callable

from .frames import Message, MsgType

WHOLE = 0xFFFF                 # ACK/NACK index meaning "the whole transfer"
MAX_CHUNKS = 0xFFFF            # indices 0 .. 0xFFFE; 0xFFFF is WHOLE
CHUNK_OVERHEAD = 4 + 8 + 4     # frame header + chunk header (tid, index, crc) + frame CRC
NACK_REASONS = {1: "chunk_crc", 2: "blob_crc", 3: "no_space"}

Outgoing = tuple[MsgType, dict[str, Any]]


class PushUsageError(RuntimeError):
    """The caller drove the machine wrongly (our bug, not the MCU's)."""


class PushState(Enum):
    IDLE = "idle"
    SENDING = "sending"
    ENDING = "ending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class PushResult:
    ok: bool
    reason: str            # "" when ok, else a slug: timeout, too_many_nacks, blob_crc, no_space, mcu_reset, ...
    detail: str
    transfer_id: int
    size: int
    chunks: int
    retransmits: int
    elapsed_s: float


def max_chunk_size(max_frame: int) -> int:
    """Largest chunk whose MODEL_CHUNK body fits a frame of ``max_frame`` bytes."""
    return max_frame - CHUNK_OVERHEAD


class ModelPush:
    def __init__(self, blob: bytes, transfer_id: int, chunk_size: int, ack_timeout_s: float = 1.0,
                 end_timeout_s: float = 5.0, retries: int = 5) -> None:
        if not blob:
            raise ValueError("nothing to push: the blob is empty")
        if not 1 <= chunk_size <= 0xFFFF:
            raise ValueError(f"chunk_size must be 1..65535, got {chunk_size}")
        n = -(-len(blob) // chunk_size)
        if n > MAX_CHUNKS or len(blob) > 0xFFFFFFFF:
            raise ValueError(f"{len(blob)} bytes need {n} chunks of {chunk_size}; the protocol allows {MAX_CHUNKS}")
        if ack_timeout_s <= 0 or end_timeout_s <= 0 or retries < 0:
            raise ValueError("timeouts must be > 0 and retries >= 0")
        self.blob = bytes(blob)
        self.transfer_id = transfer_id & 0xFFFF
        self.chunk_size = chunk_size
        self.n_chunks = n
        self.ack_timeout_s = ack_timeout_s
        self.end_timeout_s = end_timeout_s
        self.retries = retries
        self.state = PushState.IDLE
        self.current = 0                  # the chunk in flight (SENDING)
        self.deadline: float | None = None
        self.result: PushResult | None = None
        self.ignored: Counter[str] = Counter()
        self.retransmits = 0
        self.nacks = 0
        self._tries = 0                   # resends of the current step
        self._started = 0.0

    # -- inputs ---------------------------------------------------------------
    def start(self, now: float) -> list[Outgoing]:
        if self.state is not PushState.IDLE:
            raise PushUsageError("start() called twice")
        self._started = now
        self.state = PushState.SENDING
        return [self.start_message(), *self._send_step(now)]

    def receive(self, msg: Message, now: float) -> list[Outgoing]:
        if self.state is PushState.IDLE:
            raise PushUsageError("receive() before start()")
        if self.done or msg.type not in (MsgType.ACK, MsgType.NACK):
            return []
        f = msg.fields
        if f["transfer_id"] != self.transfer_id:
            self.ignored["other_transfer"] += 1
            return []
        idx = f["index"]
        if msg.type == MsgType.NACK:
            self.nacks += 1
            reason = NACK_REASONS.get(f["reason"], f"reason_{f['reason']}")
            if idx == WHOLE or reason == "no_space":
                return self._fail(now, reason, f"the MCU refused the transfer ({reason})")
            if self.state is PushState.SENDING and idx == self.current:
                return self._resend(now, "too_many_nacks", f"chunk {idx} NACKed ({reason})")
            self.ignored["stale_nack"] += 1
            return []
        if self.state is PushState.ENDING:
            if idx == WHOLE:
                self.state = PushState.DONE
                self.deadline = None
                self.result = self._result(now, True, "", "the MCU verified the blob")
            else:
                self.ignored["stale_ack"] += 1
            return []
        if idx != self.current:
            self.ignored["stale_ack"] += 1
            return []
        self.current += 1
        self._tries = 0
        return self._send_step(now)

    def tick(self, now: float) -> list[Outgoing]:
        """Call at (or after) ``deadline``: resends what is unanswered, or gives up."""
        if self.done or self.deadline is None or now < self.deadline:
            return []
        what = "MODEL_END" if self.state is PushState.ENDING else f"chunk {self.current}"
        return self._resend(now, "timeout", f"no answer to {what} after {self.retries} resends")

    def abort(self, now: float, reason: str, detail: str = "") -> None:
        """The transfer cannot go on (the MCU reset, the port vanished)."""
        if not self.done and self.state is not PushState.IDLE:
            self._fail(now, reason, detail or reason)

    # -- state ------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.state in (PushState.DONE, PushState.FAILED)

    def progress(self) -> dict[str, Any]:
        return {"state": self.state.value, "transfer_id": self.transfer_id, "chunk": self.current,
                "chunks": self.n_chunks, "retransmits": self.retransmits, "nacks": self.nacks,
                "ignored": dict(self.ignored)}

    # -- internals --------------------------------------------------------------
    def _send_step(self, now: float) -> list[Outgoing]:
        if self.current < self.n_chunks:
            i = self.current
            data = self.blob[i * self.chunk_size:(i + 1) * self.chunk_size]
            self.deadline = now + self.ack_timeout_s
            return [(MsgType.MODEL_CHUNK, {"transfer_id": self.transfer_id, "index": i, "data": data})]
        self.state = PushState.ENDING
        self.deadline = now + self.end_timeout_s
        return [(MsgType.MODEL_END, {"transfer_id": self.transfer_id, "chunks": self.n_chunks})]

    def _resend(self, now: float, reason: str, detail: str) -> list[Outgoing]:
        if self._tries >= self.retries:
            return self._fail(now, reason, detail)
        self._tries += 1
        self.retransmits += 1
        out = self._send_step(now)
        if self.state is PushState.SENDING and self.current == 0:
            # nothing ACKed yet: MODEL_BEGIN itself may have been lost, and a repeat is harmless
            out.insert(0, self.start_message())
        return out

    def start_message(self) -> Outgoing:
        return (MsgType.MODEL_BEGIN, {"transfer_id": self.transfer_id, "total_size": len(self.blob),
                                      "chunk_size": self.chunk_size, "crc32": zlib.crc32(self.blob)})

    def _fail(self, now: float, reason: str, detail: str) -> list[Outgoing]:
        self.state = PushState.FAILED
        self.deadline = None
        self.result = self._result(now, False, reason, detail)
        return []

    def _result(self, now: float, ok: bool, reason: str, detail: str) -> PushResult:
        return PushResult(ok, reason, detail, self.transfer_id, len(self.blob), self.n_chunks, self.retransmits,
                          round(now - self._started, 4))


class ModelReceiver:
    """The MCU's side of a push, sans-IO: the reference for firmware authors and the simulator's.

    Keeps at most ``capacity`` bytes (a bigger MODEL_BEGIN is NACKed ``no_space``), ACKs each
    good chunk (again for a repeat: its first ACK may have been lost), NACKs an out-of-range or
    oversize one, and at MODEL_END checks count, size and CRC-32 of the blob. ``fail_chunk``
    lets a test NACK good chunks (a flash write that failed).
    """

    def __init__(self, capacity: int, fail_chunk: Callable[[int], bool] | None = None) -> None:
        self.capacity = capacity
        self.fail_chunk = fail_chunk or (lambda index: False)
        self.begin: dict[str, Any] | None = None
        self.chunks: dict[int, bytes] = {}
        self.blob: bytes | None = None       # the last verified blob
        self.verified = 0
        self._verified_tid: int | None = None

    def reset(self) -> None:
        self.begin, self.chunks = None, {}

    def receive(self, msg: Message) -> list[Outgoing]:
        f = msg.fields
        if msg.type == MsgType.MODEL_BEGIN:
            if f["total_size"] > self.capacity or f["chunk_size"] == 0:
                self.reset()
                return [_nack(f["transfer_id"], WHOLE, 3)]
            if not (self.begin and self.begin["transfer_id"] == f["transfer_id"]):
                self.begin, self.chunks = dict(f), {}   # a repeated BEGIN keeps what we have
            return []
        b = self.begin
        if msg.type not in (MsgType.MODEL_CHUNK, MsgType.MODEL_END) or not b or f["transfer_id"] != b["transfer_id"]:
            return []  # not a transfer we know (we reset, or BEGIN was lost): the agent times out, resends
        if msg.type == MsgType.MODEL_CHUNK:
            n = -(-b["total_size"] // b["chunk_size"])
            if f["index"] >= n or len(f["data"]) > b["chunk_size"] or self.fail_chunk(f["index"]):
                return [_nack(f["transfer_id"], f["index"], 1)]
            self.chunks[f["index"]] = f["data"]
            return [(MsgType.ACK, {"transfer_id": f["transfer_id"], "index": f["index"]})]
        blob = b"".join(self.chunks.get(i, b"") for i in range(f["chunks"]))
        if len(self.chunks) != f["chunks"] or len(blob) != b["total_size"] or zlib.crc32(blob) != b["crc32"]:
            return [_nack(f["transfer_id"], WHOLE, 2)]
        if self._verified_tid != f["transfer_id"]:   # a repeated END (our ACK was lost) counts once
            self.blob, self._verified_tid = blob, f["transfer_id"]
            self.verified += 1
        return [(MsgType.ACK, {"transfer_id": f["transfer_id"], "index": WHOLE})]


def _nack(tid: int, index: int, reason: int) -> Outgoing:
    return (MsgType.NACK, {"transfer_id": tid, "index": index, "reason": reason})
