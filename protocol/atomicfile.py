"""Whole-file replacement that a crash cannot tear: temp file, fsync, rename, fsync the directory.

A reader (or a board rebooting after a power cut) sees the old file or the new one, never a
truncated mix, and never a key readable by others: the temp file is created with its final
mode from the first byte, whatever the umask or a stale temp file left by a killed process.
Every file the agent and the controller rewrite in place goes through here.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path


def sync_dir(d: str | Path) -> None:
    """Make a rename (or a new file) in ``d`` durable."""
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | bytearray | memoryview | str, mode: int = 0o644,
                 *, dir_mode: int = 0o755) -> None:
    """Replace ``path`` with ``data`` (str is UTF-8), created with ``mode``; durable on return."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True, mode=dir_mode)
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(raw).cast("B")
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


def replace_dir(new: str | Path, dest: str | Path) -> None:
    """Put the fully written directory ``new`` at ``dest`` (same filesystem), replacing what was
    there: the old tree is renamed aside first and removed last, so ``dest`` is never missing
    its contents half-way (an rmtree-then-rename leaves a window with no bundle at all, and a
    kill in it loses both)."""
    import shutil

    new, dest = Path(new), Path(dest)
    if not dest.exists():
        os.rename(new, dest)
        sync_dir(dest.parent)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(dest, old)
    os.rename(new, dest)
    sync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
