"""Signed model patches: ship only what changed between two bundle versions.

A bundle is a directory with ``manifest.json`` (which lists every file's SHA-256), so
the SHA-256 of ``manifest.json`` identifies the whole bundle. A patch from A to B holds
B's manifest and the files whose hash differs from A (a head-only change is the few-KB
``head.npz``), zstd-compressed, plus a signed patch manifest naming A's and B's hashes.
A full bundle is a patch against nothing (``base = null``).

File layout::

    0   4   magic b"EFP1"
    4   4   patch-manifest length M (uint32 LE)
    8   M   patch manifest, UTF-8 JSON, signed (protocol.signing)
    8+M ... payload: zstd frame of the changed files, concatenated

Everything is verified *before* anything is written: signature and trusted key, base
hash, payload hash, each file's hash and size, and the target manifest's hash.
"""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .signing import SignatureError, sign, verify

MAGIC = b"EFP1"
FORMAT = "edgefleet-patch/1"
#: a patch with array-level deltas (protocol/npzdelta.py): an older board refuses it by its format
FORMAT_DELTA = "edgefleet-patch/2"
MAX_MANIFEST = 1024 * 1024
MAX_PAYLOAD = 2 * 1024 * 1024 * 1024
_HDR = struct.Struct("<4sI")


class PatchError(ValueError):
    """A patch we refuse; the message says why (nothing was written)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundle_id(bundle_dir: str | Path) -> str:
    """SHA-256 of the bundle's manifest.json: it lists every file's hash, so it names the bundle."""
    p = Path(bundle_dir) / "manifest.json"
    try:
        return sha256_file(p)
    except OSError as exc:
        raise PatchError(f"{p}: {exc.strerror}") from None


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    p = Path(bundle_dir) / "manifest.json"
    try:
        m = json.loads(p.read_bytes())
    except (OSError, ValueError) as exc:
        raise PatchError(f"cannot read {p}: {exc}") from None
    if not isinstance(m, dict) or not isinstance(m.get("files"), dict) or not isinstance(m.get("version"), str):
        raise PatchError(f"{p}: needs 'version' (string) and 'files' (object)")
    return m


def _safe_rel(name: str) -> str:
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or not name or name.startswith(".") or "\\" in name:
        raise PatchError(f"unsafe file name in patch: {name!r}")
    return name


def version_key(v: str) -> tuple:
    """Order versions like 1.10.0 > 1.9.2; non-numeric parts compare as text."""
    out: list[tuple[int, Any]] = []
    for part in v.replace("-", ".").replace("+", ".").split("."):
        out.append((0, int(part)) if part.isdigit() else (1, part))
    return tuple(out)


def make_patch(old_dir: str | Path | None, new_dir: str | Path, key: Ed25519PrivateKey,
               level: int = 10, deltas: bool = True) -> tuple[bytes, dict[str, Any]]:
    """Build a signed patch from ``old_dir`` (None: a full bundle) to ``new_dir``. With ``deltas``, a
    changed ``.npz`` (a head, its reference outputs) whose old version the base holds travels as
    the arrays that changed (protocol/npzdelta.py): a run over chosen layers ships those layers."""
    import zstandard

    from .npzdelta import make_delta

    new_dir = Path(new_dir)
    new_m = read_manifest(new_dir)
    names = ["manifest.json"] + sorted(_safe_rel(n) for n in new_m["files"])
    old_hashes: dict[str, str] = {}
    base = None
    if old_dir is not None:
        old_m = read_manifest(old_dir)
        base = {"name": old_m.get("name"), "version": old_m["version"], "bundle_sha256": bundle_id(old_dir)}
        old_hashes = {n: (v or {}).get("sha256", "") for n, v in old_m["files"].items()}
    files: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    unchanged = []
    for n in names:
        data = (new_dir / n).read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if n != "manifest.json":
            listed = new_m["files"][n].get("sha256")
            if listed != digest:
                raise PatchError(f"{new_dir}/{n}: hash {digest[:12]} differs from its manifest ({str(listed)[:12]})")
            if old_hashes.get(n) == digest:
                unchanged.append(n)
                continue
            if deltas and old_dir is not None and n.endswith(".npz") and n in old_hashes:
                made = make_delta((Path(old_dir) / n).read_bytes(), data)
                if made is not None:
                    data, info = made
                    files[n] = {"sha256": digest, "size": len(data), "offset": offset, "delta": info}
                    chunks.append(data)
                    offset += len(data)
                    continue
        files[n] = {"sha256": digest, "size": len(data), "offset": offset}
        chunks.append(data)
        offset += len(data)
    raw = b"".join(chunks)
    payload = zstandard.ZstdCompressor(level=level).compress(raw)
    pm = {
        "format": FORMAT_DELTA if any("delta" in f for f in files.values()) else FORMAT, "name": new_m.get("name"), "created": round(time.time(), 3),
        "base": base,
        "target": {"version": new_m["version"], "bundle_sha256": hashlib.sha256((new_dir / "manifest.json")
                                                                              .read_bytes()).hexdigest()},
        "files": files, "unchanged": unchanged,
        "removed": sorted(set(old_hashes) - set(new_m["files"])) if old_dir is not None else [],
        "payload": {"compression": "zstd", "size": len(payload), "raw_size": len(raw),
                    "sha256": hashlib.sha256(payload).hexdigest()},
    }
    pm = sign(pm, key)
    mb = json.dumps(pm, sort_keys=True, separators=(",", ":")).encode()
    return _HDR.pack(MAGIC, len(mb)) + mb + payload, pm


def _rebuild(name: str, blob: bytes, delta: Any, current_dir: str | Path | None) -> bytes:
    """A delta entry's file: the installed one with the patch's arrays put in (npzdelta.py)."""
    from .npzdelta import DeltaError, apply_delta

    if current_dir is None or not (Path(current_dir) / name).is_file():
        raise PatchError(f"{name}: the patch carries changed arrays only, and no installed {name} to put them in")
    try:
        return apply_delta((Path(current_dir) / name).read_bytes(), blob, delta)
    except DeltaError as exc:
        raise PatchError(f"{name}: {exc}") from None


@dataclass(frozen=True)
class VerifiedPatch:
    manifest: dict[str, Any]
    files: dict[str, bytes]         # name → bytes, every hash checked
    key_id: str

    @property
    def target_version(self) -> str:
        return self.manifest["target"]["version"]

    @property
    def target_id(self) -> str:
        return self.manifest["target"]["bundle_sha256"]


def parse_patch(data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < _HDR.size:
        raise PatchError(f"truncated patch: {len(data)} bytes")
    magic, mlen = _HDR.unpack_from(data, 0)
    if magic != MAGIC:
        raise PatchError(f"not an edgefleet patch (magic {magic!r})")
    if mlen > MAX_MANIFEST or _HDR.size + mlen > len(data):
        raise PatchError(f"truncated patch: manifest of {mlen} bytes does not fit")
    try:
        pm = json.loads(data[_HDR.size:_HDR.size + mlen])
    except (UnicodeDecodeError, ValueError) as exc:
        raise PatchError(f"patch manifest is not JSON: {exc}") from None
    if not isinstance(pm, dict) or pm.get("format") not in (FORMAT, FORMAT_DELTA):
        raise PatchError(f"unsupported patch format {pm.get('format') if isinstance(pm, dict) else pm!r}")
    return pm, data[_HDR.size + mlen:]


def verify_patch(data: bytes, trusted: Iterable[Ed25519PublicKey], current_dir: str | Path | None,
                 max_raw: int = MAX_PAYLOAD) -> VerifiedPatch:
    """Check everything and return the new files in memory; raises PatchError with the reason."""
    import zstandard

    pm, payload = parse_patch(data)
    try:
        kid = verify(pm, trusted)
    except SignatureError as exc:
        raise PatchError(f"signature: {exc}") from None
    try:
        target, files, pinfo = pm["target"], pm["files"], pm["payload"]
        base = pm.get("base")
        if not isinstance(target, dict) or not isinstance(files, dict) or not isinstance(pinfo, dict):
            raise TypeError("target/files/payload must be objects")
    except (KeyError, TypeError) as exc:
        raise PatchError(f"patch manifest: {exc}") from None
    if base is not None:
        if current_dir is None:
            raise PatchError(f"patch needs base version {base.get('version')}, but no model is installed")
        have = bundle_id(current_dir)
        if have != base.get("bundle_sha256"):
            raise PatchError(f"wrong base: patch is for {base.get('version')} ({str(base.get('bundle_sha256'))[:12]}), "
                             f"installed bundle is {have[:12]}")
    if len(payload) != pinfo.get("size") or hashlib.sha256(payload).hexdigest() != pinfo.get("sha256"):
        raise PatchError("payload hash or size mismatch (corrupt or truncated patch)")
    raw_size = pinfo.get("raw_size")
    if not isinstance(raw_size, int) or not (0 <= raw_size <= max_raw):
        raise PatchError(f"payload raw size {raw_size!r} is not allowed (limit {max_raw})")
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=raw_size)
    except zstandard.ZstdError as exc:
        raise PatchError(f"payload does not decompress: {exc}") from None
    if len(raw) != raw_size:
        raise PatchError("payload decompressed to the wrong size")
    out: dict[str, bytes] = {}
    for name, info in files.items():
        _safe_rel(name)
        try:
            off, size, digest = int(info["offset"]), int(info["size"]), str(info["sha256"])
        except (KeyError, TypeError, ValueError):
            raise PatchError(f"patch manifest: bad entry for {name}") from None
        if off < 0 or size < 0 or off + size > len(raw):
            raise PatchError(f"{name}: bytes {off}..{off + size} outside the payload")
        blob = raw[off:off + size]
        if "delta" in info:
            blob = _rebuild(name, blob, info["delta"], current_dir)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise PatchError(f"{name}: SHA-256 mismatch" + (" (rebuilt from the installed file and the patch's "
                                                            "arrays)" if "delta" in info else ""))
        out[name] = blob
    if "manifest.json" not in out:
        raise PatchError("patch carries no manifest.json for the target bundle")
    if hashlib.sha256(out["manifest.json"]).hexdigest() != target.get("bundle_sha256"):
        raise PatchError("target manifest hash mismatch")
    try:
        new_m = json.loads(out["manifest.json"])
    except ValueError:
        raise PatchError("target manifest.json is not JSON") from None
    if not isinstance(new_m, dict) or new_m.get("version") != target.get("version") \
            or not isinstance(new_m.get("files"), dict):
        raise PatchError("target manifest does not match the patch's target version")
    for name, info in new_m["files"].items():
        _safe_rel(name)
        if name in out:
            if hashlib.sha256(out[name]).hexdigest() != (info or {}).get("sha256"):
                raise PatchError(f"{name}: does not match the target manifest")
        elif current_dir is None or not (Path(current_dir) / name).exists():
            raise PatchError(f"{name}: neither in the patch nor in the installed bundle")
    return VerifiedPatch(pm, out, kid)
