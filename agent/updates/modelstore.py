"""The agent's A/B model store: install verified patches without ever bricking the board.

Layout under ``<state dir>/models``::

    v-<id16>/          one installed bundle per directory (immutable once renamed in)
    current -> v-...   what the agent serves; switched by atomic rename of a new symlink
    previous -> v-...  what ``rollback`` returns to
    .staging-<id16>/   a bundle being assembled (removed on start-up)

Order of an install — stage → check → commit: verify everything in memory
(``protocol.patch``) → assemble the new version in a staging directory (unchanged files
hard-linked or copied from the current version and re-hashed) → fsync → health-check the
*staging* directory → only a version that passed is renamed into its ``v-<id>`` directory →
switch ``current`` atomically. So every ``v-*`` directory is a version that passed its gate:
``find``/``find_id``/``installed`` never see one that was killed during its check, and a
SIGKILL at any point leaves ``current`` pointing at a complete version: the old one before the
switch, the new one after it. ``recover()`` on start-up removes staging directories (the
half-done and the unchecked) and repairs a dangling pointer.

Switching to a version kept here (``switch``) obeys the same rules as installing one: the
downgrade rule (``protocol.patch.version_key``; a downgrade only when the caller says it is
allowed) and the health gate on the target, before ``current`` moves. ``rollback()`` without
checks is only for going back to the version that served just before an interrupted or refused
switch (the MCU refused its part).

``failpoint(name)`` lets tests kill the process at each step (EDGEFLEET_FAILPOINT=name);
``INSTALL_FAILPOINTS`` lists the install's, in order.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Callable, Iterable

from protocol.patch import (PatchError, VerifiedPatch, bundle_id, parse_patch, read_manifest, sha256_file,
                            verify_patch, version_key)
from protocol.atomicfile import sync_dir

#: raises with the reason when a staged bundle is not healthy; returns its figures (latency, agreement...)
HealthCheck = Callable[[Path], "dict[str, Any] | None"]


#: every step boundary of an install where a test may kill the process, in order
INSTALL_FAILPOINTS = ("staging", "staged", "gate", "healthy", "renamed", "before_switch", "switched")


def failpoint(name: str) -> None:
    if os.environ.get("EDGEFLEET_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


@dataclass(frozen=True)
class InstallResult:
    ok: bool
    version: str | None
    bundle_id: str | None
    reason: str
    steps: tuple[str, ...] = ()
    #: what the health check measured on the staged version (empty when there was none)
    health: "dict[str, Any]" = field(default_factory=dict)


class ModelStore:
    def __init__(self, root: str | Path, keep: int = 3) -> None:
        self.root = Path(root)
        self.keep = max(2, keep)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- pointers ----------------------------------------------------------
    def _link(self, name: str) -> Path | None:
        p = self.root / name
        try:
            target = os.readlink(p)
        except OSError:
            return None
        d = self.root / target
        return d if d.is_dir() else None

    @property
    def current(self) -> Path | None:
        return self._link("current")

    @property
    def previous(self) -> Path | None:
        return self._link("previous")

    def _point(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}-tmp"
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        os.symlink(target.name, tmp)
        os.replace(tmp, self.root / name)
        sync_dir(self.root)

    def versions(self) -> list[Path]:
        return sorted((p for p in self.root.glob("v-*") if p.is_dir()), key=lambda p: p.stat().st_mtime)

    def describe(self) -> dict[str, Any]:
        def info(p: Path | None) -> dict[str, Any] | None:
            if p is None:
                return None
            try:
                m = read_manifest(p)
                return {"version": m["version"], "name": m.get("name"), "dir": p.name}
            except PatchError:
                return {"dir": p.name, "error": "unreadable manifest"}
        return {"current": info(self.current), "previous": info(self.previous),
                "installed": [p.name for p in self.versions()]}

    # -- start-up ----------------------------------------------------------
    def valid(self, d: Path) -> bool:
        try:
            m = read_manifest(d)
            return all((d / n).is_file() and (d / n).stat().st_size == (i or {}).get("size", (d / n).stat().st_size)
                       for n, i in m["files"].items())
        except (PatchError, OSError):
            return False

    def recover(self) -> list[str]:
        """Remove half-done work; make ``current`` point at a complete version if any exists."""
        notes = []
        for p in self.root.glob(".staging-*"):
            shutil.rmtree(p, ignore_errors=True)
            notes.append(f"removed unfinished staging {p.name}")
        for p in self.root.glob(".*-tmp"):
            p.unlink(missing_ok=True)
        cur = self.current
        if cur is None or not self.valid(cur):
            for cand in [self.previous] + list(reversed(self.versions())):
                if cand is not None and self.valid(cand):
                    self._point("current", cand)
                    notes.append(f"current pointed at nothing usable; now {cand.name}")
                    break
        return notes

    # -- install -----------------------------------------------------------
    def install_bundle_dir(self, src: str | Path, health: HealthCheck | None = None) -> InstallResult:
        """Install a local bundle directory as-is (first model on a board, or the demo)."""
        src = Path(src)
        try:
            m = read_manifest(src)
            bid = bundle_id(src)
        except PatchError as exc:
            return InstallResult(False, None, None, str(exc))
        files = {"manifest.json": (src / "manifest.json").read_bytes()}
        for n in m["files"]:
            files[n] = (src / n).read_bytes()
        return self._install(m["version"], bid, files, m, health, allow_same=True)

    def apply_patch(self, data: bytes, trusted: Iterable[Any], health: HealthCheck | None = None,
                    allow_downgrade: bool = False) -> InstallResult:
        cur = self.current
        try:
            pm, _ = parse_patch(data)  # unverified peek: only ever used to refuse, never to install
            target = (pm.get("target") or {}).get("bundle_sha256") if isinstance(pm.get("target"), dict) else None
            if cur is not None and target == bundle_id(cur):
                return InstallResult(False, None, target, "refused: already installed", ("received",))
            vp: VerifiedPatch = verify_patch(data, trusted, cur)
        except PatchError as exc:
            return InstallResult(False, None, None, f"refused: {exc}", ("received",))
        new_m = json.loads(vp.files["manifest.json"])
        if cur is not None:
            cur_m = read_manifest(cur)
            if bundle_id(cur) == vp.target_id:
                return InstallResult(False, vp.target_version, vp.target_id, "refused: already installed",
                                     ("received", "verified"))
            if not allow_downgrade and version_key(vp.target_version) <= version_key(cur_m["version"]):
                return InstallResult(False, vp.target_version, vp.target_id,
                                     f"refused: version {vp.target_version} is not newer than the installed "
                                     f"{cur_m['version']} (replay or downgrade)", ("received", "verified"))
        files = dict(vp.files)
        return self._install(vp.target_version, vp.target_id, files, new_m, health, base=cur)

    def _install(self, version: str, bid: str, files: dict[str, bytes], manifest: dict[str, Any],
                 health: HealthCheck | None, base: Path | None = None, allow_same: bool = False) -> InstallResult:
        steps = ["received", "verified"]
        name = f"v-{bid[:16]}"
        final = self.root / name
        cur = self.current
        if cur is not None and cur.name == name and allow_same:
            return InstallResult(True, version, bid, "already installed", tuple(steps))
        staging = self.root / f".staging-{bid[:16]}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            for n, info in manifest["files"].items():
                dst = staging / n
                dst.parent.mkdir(parents=True, exist_ok=True)
                if n in files:
                    _write_file(dst, files[n])
                else:
                    src = (base or cur or staging) / n
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copyfile(src, dst)
                    if sha256_file(dst) != (info or {}).get("sha256"):
                        raise PatchError(f"{n}: installed copy does not match the target manifest")
                failpoint("staging")
            _write_file(staging / "manifest.json", files["manifest.json"])
            sync_dir(staging)
            steps.append("staged")
            failpoint("staged")
        except (PatchError, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return InstallResult(False, version, bid, f"staging failed: {exc}", tuple(steps))
        figures: dict[str, Any] = {}
        if health is not None:
            failpoint("gate")
            try:
                figures = dict(health(staging) or {})
            except Exception as exc:  # noqa: BLE001 - any failure of the candidate is a reason to refuse it
                shutil.rmtree(staging, ignore_errors=True)
                return InstallResult(False, version, bid, f"rolled back: health check failed: {exc}",
                                     tuple(steps + ["unhealthy"]))
            steps.append("healthy")
        failpoint("healthy")
        try:  # commit: only now does the version become visible
            if final.exists():
                shutil.rmtree(final)
            os.rename(staging, final)
            sync_dir(self.root)
            failpoint("renamed")
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            return InstallResult(False, version, bid, f"staging failed: {exc}", tuple(steps))
        failpoint("before_switch")
        if cur is not None:
            self._point("previous", cur)
        self._point("current", final)
        os.utime(final)
        steps.append("applied")
        failpoint("switched")
        self._prune()
        return InstallResult(True, version, bid, "installed", tuple(steps), figures)

    def switch(self, target: Path | None, health: HealthCheck | None = None,
               allow_downgrade: bool = False) -> InstallResult:
        """Serve a version kept here, under the install's rules: the downgrade rule, then the gate."""
        cur = self.current
        if target is None or not self.valid(target):
            return InstallResult(False, None, None, "that version is not installed here")
        try:
            m = read_manifest(target)
            bid = bundle_id(target)
        except PatchError as exc:
            return InstallResult(False, None, None, f"unreadable kept version: {exc}")
        version = m["version"]
        if cur is not None and target == cur:
            return InstallResult(False, version, bid, "already serving that version")
        if cur is not None and not allow_downgrade:
            try:
                cur_version = read_manifest(cur)["version"]
            except PatchError:
                cur_version = None
            if cur_version is not None and version_key(version) <= version_key(cur_version):
                return InstallResult(False, version, bid, f"refused: version {version} is not newer than the "
                                                          f"installed {cur_version} (replay or downgrade)")
        steps: list[str] = []
        figures: dict[str, Any] = {}
        if health is not None:
            try:
                figures = dict(health(target) or {})
            except Exception as exc:  # noqa: BLE001 - as for an install: any failure refuses the switch
                return InstallResult(False, version, bid, f"refused: health check failed: {exc}", ("unhealthy",))
            steps.append("healthy")
        if cur is not None:
            self._point("previous", cur)
        self._point("current", target)
        os.utime(target)
        steps.append("applied")
        return InstallResult(True, version, bid, "switched to a kept version", tuple(steps), figures)

    def rollback(self, to: Path | None = None) -> InstallResult:
        target = to or self.previous
        cur = self.current
        if target is None or not self.valid(target):
            return InstallResult(False, None, None, "no previous version to roll back to")
        if cur is not None and target == cur:
            return InstallResult(False, None, None, "already serving that version")
        if cur is not None:
            self._point("previous", cur)
        self._point("current", target)
        os.utime(target)
        m = read_manifest(target)
        return InstallResult(True, m["version"], bundle_id(target), "rolled back", ("rolled_back",))

    def find(self, version: str) -> Path | None:
        for p in self.versions():
            try:
                if read_manifest(p)["version"] == version:
                    return p
            except PatchError:
                continue
        return None

    def find_id(self, bundle_sha256: str) -> Path | None:
        """An installed, complete version whose manifest hashes to ``bundle_sha256``."""
        p = self.root / f"v-{bundle_sha256[:16]}"
        try:
            return p if p.is_dir() and self.valid(p) and bundle_id(p) == bundle_sha256 else None
        except PatchError:
            return None

    def installed(self) -> list[dict[str, Any]]:
        """Every complete version kept here (newest last): version and bundle id."""
        out = []
        for p in self.versions():
            try:
                out.append({"version": read_manifest(p)["version"], "bundle_sha256": bundle_id(p)})
            except PatchError:
                continue
        return out

    def _prune(self) -> None:
        keep = {p for p in (self.current, self.previous) if p is not None}
        vs = self.versions()
        for p in vs[:-self.keep] if len(vs) > self.keep else []:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)
