"""One resumable chunked download, sans-IO: what we hold, what is in flight, what to ask next.

The device pulls: it asks for a window of chunks (``xfer.want``), each chunk that arrives
is checked against the hash the controller signed in the offer, and the window slides.
A chunk asked for but not seen within the retransmission timeout is asked for again, so a
dropped link or a lost message costs one timeout, never the transfer.

On a fast link a big window keeps the pipe full; on a slow one (a cellular gateway) the
same window would outlast any fixed timeout and collapse into re-requests. So, when
``max_window`` > ``window``, the window adapts like TCP's: +1 chunk per chunk that
arrives (doubling per round trip) up to ``max_window``, halved when a request times out;
and the timeout follows the measured chunk round trip (RFC 6298: srtt + 4·rttvar, never
below ``retry_s``). No sockets, files or clocks inside: the caller passes ``now`` and
writes accepted bytes where it likes (``PartFile``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import os
from pathlib import Path

from protocol.chunks import ChunkError, ChunkManifest


@dataclass
class Transfer:
    manifest: ChunkManifest
    window: int = 16
    retry_s: float = 2.0
    have: set[int] = field(default_factory=set)
    max_window: int | None = None   # > window: adaptive window and timeout (see above)
    srtt: float | None = None
    rttvar: float = 0.0
    inflight: dict[int, float] = field(default_factory=dict)
    requested: int = 0          # chunk requests sent (re-requests included)
    rerequested: int = 0
    rejected: int = 0
    duplicates: int = 0

    @property
    def count(self) -> int:
        return self.manifest.count

    @property
    def rto(self) -> float:
        if self.srtt is None or self.max_window is None:
            return self.retry_s
        return min(60.0, max(self.retry_s, self.srtt + 4 * self.rttvar))

    @property
    def complete(self) -> bool:
        return len(self.have) == self.count

    @property
    def received_bytes(self) -> int:
        return sum(self.manifest.chunk_size_of(i) for i in self.have)

    def expected_size(self, index: int) -> int:
        return self.manifest.chunk_size_of(index)

    def check(self, index: object, data: bytes) -> None:
        """Raise ChunkError unless ``data`` is exactly chunk ``index`` of the signed manifest."""
        try:
            self.manifest.check(index, data)
        except ChunkError:
            self.rejected += 1
            raise

    def accept(self, index: int, data: bytes, now: float | None = None) -> bool:
        """Check and record chunk ``index``; False for a duplicate (nothing to write)."""
        self.check(index, data)
        sent = self.inflight.pop(index, None)
        if index in self.have:
            self.duplicates += 1
            return False
        self.have.add(index)
        if self.max_window is not None and now is not None and sent is not None:
            sample = max(0.0, now - sent)
            if self.srtt is None:
                self.srtt, self.rttvar = sample, sample / 2
            else:
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - sample)
                self.srtt = 0.875 * self.srtt + 0.125 * sample
            if self.window < self.max_window:
                self.window += 1
        return True

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.have]

    def wants(self, now: float, force: bool = False) -> list[int]:
        """Chunk indices to ask for now: expired requests again, then new ones up to the window.

        Asks only when the window is at least half free (fewer, larger requests) unless
        ``force`` (a reconnect: everything in flight may be lost)."""
        if force:
            self.rerequested += len(self.inflight)
            self.inflight.clear()
        expired = [i for i, t in self.inflight.items() if now - t >= self.rto]
        for i in expired:
            del self.inflight[i]
            self.rerequested += 1
        if expired and self.max_window is not None:
            self.window = max(1, self.window // 2)   # a loss or a slow link: back off
        free = self.window - len(self.inflight)
        if free <= 0 or (free < max(1, self.window // 2) and self.inflight):
            return []
        out = []
        for i in range(self.count):
            if len(out) >= free:
                break
            if i not in self.have and i not in self.inflight:
                out.append(i)
        for i in out:
            self.inflight[i] = now
        self.requested += len(out)
        return out


class PartFile:
    """The bytes of a transfer on disk, written chunk by chunk at their offsets.

    Nothing else is persisted: on restart ``held()`` re-hashes every chunk region against
    the manifest, so a chunk half-written when the power went is simply asked for again."""

    def __init__(self, directory: Path, manifest: ChunkManifest) -> None:
        self.dir = directory
        self.manifest = manifest
        self.path = directory / "patch.part"
        directory.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with open(self.path, "wb") as fh:
                fh.truncate(manifest.total_size)

    def write(self, index: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, index * self.manifest.chunk_size)
        finally:
            os.close(fd)

    def held(self) -> set[int]:
        m = self.manifest
        out: set[int] = set()
        try:
            with open(self.path, "rb") as fh:
                for i in range(m.count):
                    fh.seek(i * m.chunk_size)
                    data = fh.read(m.chunk_size_of(i))
                    if hashlib.sha256(data).hexdigest() == m.chunk_sha256[i]:
                        out.add(i)
        except OSError:
            return set()
        return out

    def read_all(self) -> bytes:
        data = self.path.read_bytes()
        if len(data) != self.manifest.total_size or hashlib.sha256(data).hexdigest() != self.manifest.sha256:
            raise ChunkError("assembled transfer does not match the manifest's SHA-256")
        return data
