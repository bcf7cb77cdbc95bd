"""Where a bundle version came from: the manifest's ``lineage`` object (validated here; the
bundle loader in protocol/bundle.py keeps it in ``manifest.raw``).

Shapes (every kind has ``kind`` and ``parent_version`` — null for a first version)::

    {"kind": "built", "parent_version": null, "source": {"file": ..., "sha256": ...},
     "calibration_sha256": ..., "eval_sha256": ..., "tool": "..."}
    {"kind": "federated", "parent_version": "digits@1", "parent_sha256": ..., "run_id": "run-...",
     "rounds": [1, 2, 3], "devices": ["pi-1", ...], "n_devices": 3, "strategy": "fedavg",
     "dp": {"epsilon": 1.2, "delta": 1e-5} | null}
    {"kind": "patch", "parent_version": "digits@1", "parent_sha256": ..., "patch_sha256": ...}
    {"kind": "derived", "parent_version": ..., "parent_sha256": ..., "note": "..."}

Pure: no I/O beyond hashing a file the caller names.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping

KINDS = ("built", "federated", "patch", "derived")
_HEX = set("0123456789abcdef")


class LineageError(ValueError):
    pass


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha(v: Any, where: str) -> None:
    if not (isinstance(v, str) and len(v) == 64 and set(v) <= _HEX):
        raise LineageError(f"lineage.{where} must be a sha256 hex digest")


def validate(lin: Any) -> dict[str, Any]:
    """The lineage object if it is well formed, else LineageError naming the field."""
    if not isinstance(lin, Mapping):
        raise LineageError("lineage must be an object")
    kind = lin.get("kind")
    if kind not in KINDS:
        raise LineageError(f"lineage.kind must be one of {', '.join(KINDS)}, got {kind!r}")
    parent = lin.get("parent_version")
    if parent is not None and not isinstance(parent, str):
        raise LineageError("lineage.parent_version must be a string or null")
    for k in ("parent_sha256", "calibration_sha256", "eval_sha256", "patch_sha256"):
        if lin.get(k) is not None:
            _sha(lin[k], k)
    if kind == "built":
        src = lin.get("source")
        if not isinstance(src, Mapping) or "sha256" not in src:
            raise LineageError("lineage.source {file, sha256} is required for a built model")
        _sha(src["sha256"], "source.sha256")
    if kind == "federated":
        if not isinstance(lin.get("run_id"), str) or not lin["run_id"]:
            raise LineageError("lineage.run_id is required for a federated result")
        if parent is None:
            raise LineageError("lineage.parent_version is required for a federated result")
        rounds, devices = lin.get("rounds"), lin.get("devices")
        if not (isinstance(rounds, list) and all(isinstance(r, int) for r in rounds)):
            raise LineageError("lineage.rounds must be a list of round numbers")
        if not (isinstance(devices, list) and all(isinstance(d, str) for d in devices)):
            raise LineageError("lineage.devices must be a list of device ids")
        if lin.get("n_devices") != len(devices):
            raise LineageError("lineage.n_devices must count lineage.devices")
        if not isinstance(lin.get("strategy"), str):
            raise LineageError("lineage.strategy is required for a federated result")
        dp = lin.get("dp")
        if dp is not None and not (isinstance(dp, Mapping) and isinstance(dp.get("epsilon"), (int, float))):
            raise LineageError("lineage.dp must be null or {epsilon, delta}")
    return dict(lin)


def of_manifest(raw: Mapping[str, Any]) -> dict[str, Any] | None:
    """The validated lineage of a manifest (``manifest.raw``), None for a bundle made before lineage."""
    lin = raw.get("lineage")
    if lin is None:
        return None
    lin = validate(lin)
    if lin.get("parent_version") != raw.get("parent_version") and raw.get("parent_version") is not None:
        raise LineageError(f"lineage.parent_version {lin.get('parent_version')!r} disagrees with the manifest's "
                           f"parent_version {raw.get('parent_version')!r}")
    return lin


def summary(lin: Mapping[str, Any] | None) -> str:
    """One line for a human."""
    if not lin:
        return "no lineage recorded"
    k = lin["kind"]
    if k == "federated":
        dp = lin.get("dp")
        return (f"federated run {lin['run_id']}: rounds {','.join(map(str, lin['rounds'])) or '-'}, "
                f"{lin['n_devices']} device(s), {lin['strategy']}"
                + (f", DP ε={dp['epsilon']:.3g} δ={dp.get('delta')}" if dp else ", no DP"))
    if k == "built":
        return (f"built from {lin['source'].get('file', '?')} (sha256 {lin['source']['sha256'][:12]})"
                + (f", calibration {lin['calibration_sha256'][:12]}" if lin.get("calibration_sha256") else "")
                + (f", eval {lin['eval_sha256'][:12]}" if lin.get("eval_sha256") else ""))
    if k == "patch":
        return f"patched from {lin.get('parent_version')}" + (f" (patch {lin['patch_sha256'][:12]})"
                                                               if lin.get("patch_sha256") else "")
    return f"derived from {lin.get('parent_version')}" + (f": {lin['note']}" if lin.get("note") else "")
