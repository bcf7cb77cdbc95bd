"""Per-board learning state tied to one bundle (SCAFFOLD's cᵢ, a personal head): named float32
arrays in one npz with a checksum and the bundle id, written by temp file + fsync + rename.

``read`` refuses a file that is unreadable, for another bundle or corrupt, with the reason
(``BoundStateError``); what the caller does with a refusal (reset, or ignore) is its policy.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Mapping
import zipfile

import numpy as np
from protocol.atomicfile import write_atomic


class BoundStateError(ValueError):
    """A stored state file we will not use; the message says why."""


def digest(arrays: Mapping[str, np.ndarray], bundle_id: str) -> str:
    h = hashlib.sha256(bundle_id.encode())
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k], np.float32)
        h.update(k.encode() + b"\0" + json.dumps(list(a.shape)).encode() + a.tobytes())
    return h.hexdigest()


def write(path: Path, arrays: Mapping[str, np.ndarray], bundle_id: str, prefix: str) -> None:
    arrays = {k: np.asarray(v, np.float32) for k, v in arrays.items()}
    meta = {"bundle_id": bundle_id, "sha256": digest(arrays, bundle_id)}
    buf = io.BytesIO()
    np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
             **{f"{prefix}{k}": v for k, v in arrays.items()})
    write_atomic(path, buf.getbuffer())


def read(path: Path, bundle_id: str, prefix: str) -> dict[str, np.ndarray]:
    """The arrays of ``path`` (which must exist), checked against ``bundle_id`` and the checksum."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            arrays = {k[len(prefix):]: np.asarray(z[k], np.float32) for k in z.files if k.startswith(prefix)}
    except (OSError, ValueError, KeyError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise BoundStateError(f"{path.name} unreadable: {exc}") from None
    other = meta.get("bundle_id") if isinstance(meta, dict) else "?"
    if other != bundle_id:
        raise BoundStateError(f"{path.name} is for bundle {other}, not {bundle_id}")
    if meta.get("sha256") != digest(arrays, bundle_id):
        raise BoundStateError(f"{path.name}: checksum mismatch (corrupt)")
    return arrays
