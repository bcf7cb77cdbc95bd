"""The relay's chunk cache: bounded, content-addressed, on disk, surviving restarts.

A chunk is stored under its own SHA-256 (``<dir>/<sha[:2]>/<sha>``), written to a temporary file
and renamed into place, so a chunk file is either whole or absent. Reads re-hash the bytes: a
file that rotted on disk (or was tampered with) is evicted and reported missing, never served.
Beyond ``max_bytes`` the least recently used chunks go first (recency is the file's mtime, touched
on every read, so the order survives a restart). One chunk shared by two patches is stored once.
"""
from __future__ import annotations

from collections import OrderedDict
import hashlib
import os
import time
from pathlib import Path

from protocol.atomicfile import write_atomic


class ChunkCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lru: OrderedDict[str, int] = OrderedDict()   # sha -> size, least recent first
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evicted = 0
        self.corrupt = 0
        self._scan()

    def _path(self, sha: str) -> Path:
        return self.dir / sha[:2] / sha

    def _scan(self) -> None:
        """Rebuild the index from disk (a restart): half-written temporaries are removed."""
        found: list[tuple[float, str, int]] = []
        for sub in self.dir.iterdir():
            if not sub.is_dir():
                continue
            for f in sub.iterdir():
                if f.name.startswith(".") or len(f.name) != 64:
                    f.unlink(missing_ok=True)
                    continue
                st = f.stat()
                found.append((st.st_mtime, f.name, st.st_size))
        for _, sha, size in sorted(found):
            self._lru[sha] = size
            self.bytes += size
        self._evict()

    def __contains__(self, sha: str) -> bool:
        return sha in self._lru

    def __len__(self) -> int:
        return len(self._lru)

    def put(self, sha: str, data: bytes) -> bool:
        """Store ``data`` as chunk ``sha``; False (nothing stored) when the bytes do not hash to it."""
        if hashlib.sha256(data).hexdigest() != sha:
            self.corrupt += 1
            return False
        if sha in self._lru:
            self._lru.move_to_end(sha)
            return True
        write_atomic(self._path(sha), data)   # a dot-named temporary, then the rename
        self._lru[sha] = len(data)
        self.bytes += len(data)
        self._evict(keep=sha)
        return True

    def get(self, sha: str) -> bytes | None:
        """The chunk's bytes, or None (not held, or found corrupt and evicted)."""
        if sha not in self._lru:
            self.misses += 1
            return None
        p = self._path(sha)
        try:
            data = p.read_bytes()
        except OSError:
            self._drop(sha)
            self.misses += 1
            return None
        if hashlib.sha256(data).hexdigest() != sha:
            self.corrupt += 1
            self.evict(sha)
            self.misses += 1
            return None
        self.hits += 1
        self._lru.move_to_end(sha)
        now = time.time()
        try:
            os.utime(p, (now, now))
        except OSError:
            pass
        return data

    def evict(self, sha: str) -> None:
        """Remove one chunk (a board or a read found it bad)."""
        if sha in self._lru:
            self._path(sha).unlink(missing_ok=True)
            self._drop(sha)
            self.evicted += 1

    def _drop(self, sha: str) -> None:
        size = self._lru.pop(sha, None)
        if size is not None:
            self.bytes -= size

    def _evict(self, keep: str | None = None) -> None:
        while self.bytes > self.max_bytes and self._lru:
            sha = next(iter(self._lru))
            if sha == keep and len(self._lru) == 1:
                break
            self.evict(sha)

    def stats(self) -> dict[str, int]:
        return {"chunks": len(self._lru), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                "misses": self.misses, "evicted": self.evicted, "corrupt": self.corrupt}
