"""One process per state: an ``fcntl`` lock file, held for the life of the process.

Two ``fleetctl serve`` on one registry, or two agents on one state dir, would not corrupt anything
at once — they push each other off the broker (one identity, one connection) every half second and
fight over the same files. The lock turns that into a clear refusal at start. ``flock`` locks die
with the process (kill -9 included), so a stale file never blocks a restart; the file records the
holder's pid and command line for the message.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
import sys


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message names it."""


class InstanceLock:
    def __init__(self, path: str | Path, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "InstanceLock":
        """Take the lock or raise LockHeld (OSError if the directory is not writable)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise LockHeld(f"{self.what} is already in use by {holder} (lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv[:4])[:200]})\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            finally:
                os.close(self._fd)   # closing drops the flock
                self._fd = None

    def __enter__(self) -> "InstanceLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
