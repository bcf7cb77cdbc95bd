"""The serial link as a sans-IO protocol object (h11's shape): bytes in, messages out.

``receive_data(bytes)`` buffers; ``next_event()`` returns the next ``Message`` or ``None``
(need more data). ``send(type, fields)`` returns the bytes to write. No port, thread or clock
inside. The peer's bad input (garbage, bit flips, truncated or oversize frames, duplicates)
is dropped with a counter and the link resynchronises on the next 0x00 — never an
exception, never a stuck parser. The receive buffer and the queue of decoded messages are capped.
"""
from __future__ import annotations

from collections import Counter, deque

from . import cobs
from .frames import MAX_FRAME_DEFAULT, FrameError, Message, MsgType, decode_body, encode_body


class Link:
    def __init__(self, max_frame: int = MAX_FRAME_DEFAULT, max_events: int = 1024) -> None:
        self.max_frame = max_frame
        self.max_events = max_events  # decoded messages not yet taken; the oldest go first (counted)
        self._buf = bytearray()
        self._discarding = False
        self._events: deque[Message] = deque()
        self._tx_seq = 0
        self._rx_seq: int | None = None
        self.dropped: Counter[str] = Counter()
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0

    @property
    def wire_limit(self) -> int:
        """Largest encoded frame accepted: body + COBS overhead."""
        return self.max_frame + self.max_frame // 254 + 2

    def receive_data(self, data: bytes) -> None:
        self.bytes_in += len(data)
        data = bytes(data)
        start = 0
        while True:
            i = data.find(b"\x00", start)
            if i < 0:
                self._append(data[start:])
                return
            self._append(data[start:i])
            self._frame_end()
            start = i + 1

    def _append(self, part: bytes) -> None:
        if self._discarding or not part:
            return
        if len(self._buf) + len(part) > self.wire_limit:
            self.dropped["oversize"] += 1
            self._buf.clear()
            self._discarding = True  # skip to the next delimiter
            return
        self._buf += part

    def _frame_end(self) -> None:
        raw = bytes(self._buf)
        self._buf.clear()
        if self._discarding:
            self._discarding = False
            return
        if not raw:
            return  # back-to-back delimiters are allowed (line idle / resync)
        try:
            msg = decode_body(cobs.decode(raw))
            if msg.type == MsgType.HELLO:
                self._rx_seq = None
        except cobs.DecodeError:
            self.dropped["cobs"] += 1
            return
        except FrameError as exc:
            self.dropped[exc.reason] += 1
            return
        if self._rx_seq is not None:
            delta = (msg.seq - self._rx_seq) & 0xFFFF
            if delta == 0:
                self.dropped["duplicate"] += 1
                return
            if delta != 1 and msg.type != MsgType.HELLO:
                self.dropped["seq_gap"] += 1  # counted; the frame itself is good and delivered
        self._rx_seq = msg.seq
        self.frames_in += 1
        if len(self._events) >= self.max_events:
            self._events.popleft()
            self.dropped["events_overflow"] += 1
        self._events.append(msg)

    def next_event(self) -> Message | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Message]:
        out = list(self._events)
        self._events.clear()
        return out

    def send(self, type_: MsgType, fields: dict) -> bytes:
        body = encode_body(Message(type_, self._tx_seq, fields))
        if len(body) > self.max_frame:
            raise ValueError(f"{type_.name} frame of {len(body)} bytes exceeds the link's {self.max_frame}")  # our bug
        self._tx_seq = (self._tx_seq + 1) & 0xFFFF
        self.frames_out += 1
        # a leading delimiter too: whatever noise preceded this frame ends there (resync)
        return b"\x00" + cobs.encode(body) + b"\x00"

    def reset_peer(self) -> None:
        """The MCU restarted (new HELLO): its sequence numbers start over."""
        self._rx_seq = None

    def stats(self) -> dict:
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "bytes_in": self.bytes_in,
                "dropped": dict(self.dropped)}
