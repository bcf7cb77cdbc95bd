"""Resumable chunked transfer of large files (backbones, MCU images) — sans-IO.

The sender cuts a blob into fixed-size chunks and announces a manifest (total size,
chunk size, SHA-256 of the whole and of every chunk). The receiver keeps a bitmap of
what it holds, verifies every chunk against the manifest before storing it, and can
at any time say which chunks it still lacks — so a link that drops mid-transfer
resumes with only those. No sockets, files or clocks inside; the agent persists
``ChunkReceiver.state()`` and chunk bytes where it likes.
"""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
from typing import Any, Iterator, Mapping

DEFAULT_CHUNK = 64 * 1024
MAX_CHUNK = 1024 * 1024
MAX_TOTAL = 2 * 1024 * 1024 * 1024
MAX_CHUNKS = 65536


class ChunkError(ValueError):
    """A chunk or manifest from the peer that we refuse (counted, transfer goes on)."""


@dataclass(frozen=True)
class ChunkManifest:
    transfer_id: str
    total_size: int
    chunk_size: int
    sha256: str
    chunk_sha256: tuple[str, ...]

    @property
    def count(self) -> int:
        return len(self.chunk_sha256)

    def chunk_size_of(self, index: int) -> int:
        """Bytes in chunk ``index`` (the last one may be short)."""
        return min(self.chunk_size, self.total_size - index * self.chunk_size)

    def check(self, index: object, data: bytes) -> None:
        """Raise ChunkError unless ``data`` is exactly chunk ``index`` of this manifest."""
        if isinstance(index, bool) or not isinstance(index, int) or not (0 <= index < self.count):
            raise ChunkError(f"chunk index {index!r} out of range 0..{self.count - 1}")
        if len(data) != self.chunk_size_of(index):
            raise ChunkError(f"chunk {index}: {len(data)} bytes, expected {self.chunk_size_of(index)}")
        if hashlib.sha256(data).hexdigest() != self.chunk_sha256[index]:
            raise ChunkError(f"chunk {index}: SHA-256 mismatch")

    def to_dict(self) -> dict[str, Any]:
        return {"transfer_id": self.transfer_id, "total_size": self.total_size, "chunk_size": self.chunk_size,
                "sha256": self.sha256, "chunk_sha256": list(self.chunk_sha256)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ChunkManifest":
        try:
            tid, total, size = d["transfer_id"], d["total_size"], d["chunk_size"]
            whole, hashes = d["sha256"], d["chunk_sha256"]
        except (KeyError, TypeError) as exc:
            raise ChunkError(f"chunk manifest: missing field {exc}") from None
        if not isinstance(tid, str) or not (0 < len(tid) <= 64):
            raise ChunkError("chunk manifest: transfer_id must be a 1-64 char string")
        for name, v, hi in (("total_size", total, MAX_TOTAL), ("chunk_size", size, MAX_CHUNK)):
            if isinstance(v, bool) or not isinstance(v, int) or not (0 <= v <= hi):
                raise ChunkError(f"chunk manifest: {name} must be an integer in 0..{hi}")
        if size == 0:
            raise ChunkError("chunk manifest: chunk_size must be > 0")
        if not _is_hex64(whole):
            raise ChunkError("chunk manifest: sha256 must be 64 hex chars")
        if not isinstance(hashes, list) or len(hashes) > MAX_CHUNKS or not all(_is_hex64(h) for h in hashes):
            raise ChunkError("chunk manifest: chunk_sha256 must be a list of 64-hex-char strings")
        expected = max(1, -(-total // size)) if total else 0
        if len(hashes) != expected:
            raise ChunkError(f"chunk manifest: {total} bytes in chunks of {size} needs {expected} hashes, "
                             f"got {len(hashes)}")
        return cls(tid, total, size, whole, tuple(hashes))


def _is_hex64(s: Any) -> bool:
    return isinstance(s, str) and len(s) == 64 and all(c in "0123456789abcdef" for c in s)


def make_manifest(transfer_id: str, blob: bytes, chunk_size: int = DEFAULT_CHUNK) -> ChunkManifest:
    if not (0 < chunk_size <= MAX_CHUNK):
        raise ValueError(f"chunk_size must be 1..{MAX_CHUNK}")
    hashes = tuple(hashlib.sha256(blob[i:i + chunk_size]).hexdigest() for i in range(0, len(blob), chunk_size))
    return ChunkManifest(transfer_id, len(blob), chunk_size, hashlib.sha256(blob).hexdigest(), hashes)


def iter_chunks(blob: bytes, manifest: ChunkManifest, indices: list[int] | None = None) -> Iterator[tuple[int, bytes]]:
    for i in (range(manifest.count) if indices is None else indices):
        if not (0 <= i < manifest.count):
            raise ChunkError(f"chunk index {i} out of range 0..{manifest.count - 1}")
        yield i, blob[i * manifest.chunk_size:(i + 1) * manifest.chunk_size]


class ChunkReceiver:
    """Collects verified chunks in memory up to the manifest's size (which the caller capped)."""

    def __init__(self, manifest: ChunkManifest, max_total: int = MAX_TOTAL) -> None:
        if manifest.total_size > max_total:
            raise ChunkError(f"transfer of {manifest.total_size} bytes exceeds the limit of {max_total}")
        self.manifest = manifest
        self._chunks: dict[int, bytes] = {}
        self.rejected = 0
        self.duplicates = 0

    def accept(self, index: int, data: bytes) -> bool:
        """Store chunk ``index``; False for a duplicate; ChunkError for a bad one (state unchanged)."""
        try:
            self.manifest.check(index, data)
        except ChunkError:
            self.rejected += 1
            raise
        if index in self._chunks:
            self.duplicates += 1
            return False
        self._chunks[index] = bytes(data)
        return True

    def missing(self) -> list[int]:
        return [i for i in range(self.manifest.count) if i not in self._chunks]

    @property
    def complete(self) -> bool:
        return len(self._chunks) == self.manifest.count

    @property
    def received_bytes(self) -> int:
        return sum(len(c) for c in self._chunks.values())

    def assemble(self) -> bytes:
        if not self.complete:
            raise ChunkError(f"transfer incomplete: {len(self.missing())} chunks missing")
        blob = b"".join(self._chunks[i] for i in range(self.manifest.count))
        if hashlib.sha256(blob).hexdigest() != self.manifest.sha256:
            raise ChunkError("assembled blob SHA-256 does not match the manifest")
        return blob
