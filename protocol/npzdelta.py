"""Array-level deltas of ``.npz`` files, so a patch carries only the tensors that changed.

A federated run over chosen layers (protocol/layers.py ``trainable``) changes a few tensors of the
head; the rest of ``head.npz`` (frozen layers) and of ``reference.npz`` (the inputs) is the same
bytes as on the board. A patch then ships those arrays only, and the board rebuilds the file from
its installed copy. That works because bundles write their ``.npz`` files canonically
(``npz_bytes``: fixed zip timestamps, stored entries, a given array order): the same arrays give the
same bytes everywhere, so the rebuilt file is checked against the SHA-256 the target manifest
lists — the board installs it only if it is bit for bit the file the controller signed for.
"""
from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any, Mapping

import numpy as np

#: the ``delta`` entry format in a patch's file list (protocol/patch.py)
FORMAT = "npz-arrays/1"
_EPOCH = (1980, 1, 1, 0, 0, 0)


class DeltaError(ValueError):
    """A delta that cannot be applied; the message says why."""


def npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """An ``.npz`` (what ``np.load`` reads) whose bytes depend only on the arrays and their order."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, value in arrays.items():
            arr = io.BytesIO()
            np.lib.format.write_array(arr, np.asarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_EPOCH)
            info.create_system = 3
            info.external_attr = 0o644 << 16
            zf.writestr(info, arr.getvalue())
    return buf.getvalue()


def read_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` in file order (no pickles)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DeltaError(f"not a readable .npz: {exc}") from None


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def make_delta(old: bytes, new: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """(the changed arrays as a canonical ``.npz``, the entry that says how to rebuild ``new``), or
    None when a delta does not apply (either file unreadable, ``new`` not canonical, nothing saved)."""
    try:
        before, after = read_npz(old), read_npz(new)
    except DeltaError:
        return None
    if npz_bytes(after) != new:
        return None      # written by another writer: the board could not rebuild these bytes
    changed = {k: v for k, v in after.items() if k not in before or not _same(before[k], v)}
    if len(changed) == len(after):
        return None
    blob = npz_bytes(changed)
    if len(blob) >= len(new):
        return None
    info = {"format": FORMAT, "order": list(after), "changed": list(changed),
            "base_sha256": hashlib.sha256(old).hexdigest(), "delta_sha256": hashlib.sha256(blob).hexdigest()}
    return blob, info


def apply_delta(old: bytes, blob: bytes, info: Mapping[str, Any]) -> bytes:
    """The new file's bytes from the installed ``old`` and a delta ``blob`` (the caller checks the
    result's SHA-256 against the target manifest)."""
    if not isinstance(info, Mapping) or info.get("format") != FORMAT:
        raise DeltaError(f"unsupported delta format {info.get('format') if isinstance(info, Mapping) else info!r}")
    order, changed = info.get("order"), info.get("changed")
    if not isinstance(order, list) or not all(isinstance(n, str) for n in order) \
            or not isinstance(changed, list) or not set(changed) <= set(order):
        raise DeltaError("delta entry: 'order' and 'changed' must be lists of array names, changed within order")
    if hashlib.sha256(old).hexdigest() != info.get("base_sha256"):
        raise DeltaError("the installed file is not the one the delta was made against")
    if hashlib.sha256(blob).hexdigest() != info.get("delta_sha256"):
        raise DeltaError("delta SHA-256 mismatch")
    before, part = read_npz(old), read_npz(blob)
    if sorted(part) != sorted(changed):
        raise DeltaError(f"delta holds arrays {sorted(part)}, its entry names {sorted(changed)}")
    missing = [n for n in order if n not in part and n not in before]
    if missing:
        raise DeltaError(f"arrays {missing} are neither in the delta nor in the installed file")
    return npz_bytes({n: part[n] if n in part else before[n] for n in order})
