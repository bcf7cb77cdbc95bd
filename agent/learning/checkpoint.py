"""The learner's checkpoint: head, replay buffer and counters in ONE file, replaced atomically.

One file (``checkpoint.npz``) rather than a head file beside a metadata file, so a power cut
can never pair a new head with old counters: the reader sees the whole old checkpoint or
the whole new one (temp file in the same directory, fsync, ``os.replace``, fsync of the
directory). Plain ``.npz`` without pickle: head tensors under ``head/<name>``, the buffer's
arrays under ``replay/<name>``, and the metadata as UTF-8 JSON bytes under ``meta``.

Older agents wrote ``head.npz`` + ``meta.json``; ``read_checkpoint`` still restores those
(head and counters only).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from protocol.atomicfile import write_atomic

FILE = "checkpoint.npz"
MAX_BYTES = 256 << 20


class CheckpointError(ValueError):
    """The checkpoint is missing, unreadable or inconsistent (the learner then starts fresh)."""


def write_checkpoint(directory: str | Path, head: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                     replay: Mapping[str, np.ndarray] | None = None) -> Path:
    from protocol.bundle import check_head  # lazily: the training child imports this package too

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {f"head/{k}": v for k, v in check_head(head).items()}
    for k, v in (replay or {}).items():
        arrays[f"replay/{k}"] = np.asarray(v)
    arrays["meta"] = np.frombuffer(json.dumps(dict(meta), sort_keys=True).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path = d / FILE
    write_atomic(path, buf.getbuffer())
    return path


def read_checkpoint(directory: str | Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    """(head, meta, replay arrays) — or ``CheckpointError`` saying what is wrong."""
    from protocol.bundle import check_head

    d = Path(directory)
    path = d / FILE
    if not path.exists():
        return _read_legacy(d)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise CheckpointError(f"{path.name} is larger than {MAX_BYTES} bytes")
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt archive raises OSError, ValueError, BadZipFile, EOFError...
        raise CheckpointError(f"{path.name} unreadable: {type(exc).__name__}: {exc}") from None
    odd = sorted(k for k, v in raw.items() if not isinstance(v, np.ndarray))
    if odd:  # np.load hands back raw bytes for a member that is not an .npy array
        raise CheckpointError(f"{path.name}: members {odd} are not arrays")
    try:
        meta = json.loads(bytes(raw.pop("meta").astype(np.uint8)).decode())
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"{path.name}: no readable meta ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path.name}: meta is not an object")
    try:
        head = check_head({k[5:]: v for k, v in raw.items() if k.startswith("head/")})
    except ValueError as exc:
        raise CheckpointError(f"{path.name}: head: {exc}") from None
    replay = {k[7:]: v for k, v in raw.items() if k.startswith("replay/")}
    return head, meta, replay


def _read_legacy(d: Path) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, np.ndarray]]:
    from protocol.bundle import load_head

    try:
        meta = json.loads((d / "meta.json").read_text())
    except (OSError, ValueError):
        raise CheckpointError("no checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError("meta.json is not an object")
    try:
        head = load_head(d / "head.npz")
    except ValueError as exc:
        raise CheckpointError(f"checkpoint head unreadable: {exc}") from None
    return head, meta, {}
