"""Rollout state in the registry's SQLite file: artifacts, rollouts, per-device slots,
each device's desired bundle, and device tags.

The CLI writes rollouts and desired versions; ``fleetctl serve`` acts on them. Artifacts
(bundle directories and patch files) live beside the database in ``artifacts/``, each
renamed into place only once complete, named by hash.

Artifacts are content-addressed: a bundle by its bundle id (the SHA-256 of its manifest,
which lists every file's hash), a patch by the SHA-256 of its bytes, and each one records
the bundle it produces (``bundle_sha256``). Two patches for the same pair of versions are two
artifacts. A rollout records the artifact it was made from; ``made_from`` marks the patches
the controller derived itself from a stored bundle. An artifact a device refused for an
integrity or signature reason is *quarantined* (``quarantined``, ``quarantine_reason``):
it is never offered again and cannot be deployed again.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

from ..db import Database, add_missing_columns, as_database, baseline, connect, end_read, has_table, migrate, transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS artifacts(
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, name TEXT, version TEXT NOT NULL, bundle_sha256 TEXT NOT NULL,
    base_sha256 TEXT, path TEXT NOT NULL, size INTEGER NOT NULL, created REAL NOT NULL,
    made_from TEXT, quarantined REAL, quarantine_reason TEXT);
CREATE INDEX IF NOT EXISTS artifacts_target ON artifacts(bundle_sha256);
CREATE TABLE IF NOT EXISTS rollouts(
    id TEXT PRIMARY KEY, created REAL NOT NULL, status TEXT NOT NULL, version TEXT NOT NULL,
    bundle_sha256 TEXT NOT NULL, policy TEXT NOT NULL, selector TEXT NOT NULL, waves INTEGER NOT NULL,
    wave INTEGER NOT NULL DEFAULT -1, wave_started REAL, reason TEXT, figures TEXT, updated REAL, finished REAL,
    artifact_id TEXT);
CREATE TABLE IF NOT EXISTS rollout_devices(
    rollout_id TEXT NOT NULL, device_id TEXT NOT NULL, wave INTEGER NOT NULL, status TEXT NOT NULL,
    reason TEXT, from_sha256 TEXT, from_version TEXT, conf_before REAL, conf_after REAL,
    offered REAL, updated REAL, acc_before REAL, acc_after REAL, PRIMARY KEY(rollout_id, device_id));
CREATE TABLE IF NOT EXISTS desired(
    device_id TEXT PRIMARY KEY, bundle_sha256 TEXT NOT NULL, version TEXT NOT NULL, rollout_id TEXT,
    set_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS device_tags(device_id TEXT NOT NULL, tag TEXT NOT NULL, PRIMARY KEY(device_id, tag));
"""
# registries made before fleet accuracy was tracked lack the acc_* columns (and the quarantine ones)
ADD_COLUMNS = {"rollout_devices": {"acc_before": "REAL", "acc_after": "REAL"},
               "artifacts": {"made_from": "TEXT", "quarantined": "REAL", "quarantine_reason": "TEXT"},
               "rollouts": {"artifact_id": "TEXT"}}
#: versioned migrations of the rollout tables (controller/db.py ``migrate``); 1 is the baseline
MIGRATIONS = [
    baseline(SCHEMA, ADD_COLUMNS),
    # 2: operator control and soaking (issue 17): when the current wave's soak began, when it was
    # paused, and an abort that keeps devices that already applied the new version
    lambda db: add_missing_columns(db, {"rollouts": {"soak_started": "REAL", "paused_at": "REAL",
                                                     "keep_updated": "INTEGER"}}),
]


@dataclass(frozen=True)
class Artifact:
    id: str
    kind: str              # bundle | patch
    name: str | None
    version: str
    bundle_sha256: str     # the bundle it is (bundle) or produces (patch)
    base_sha256: str | None
    path: str
    size: int
    made_from: str | None = None          # patches the controller made: the bundle artifact they came from
    quarantined: float | None = None      # when a device refused it for integrity/signature reasons
    quarantine_reason: str | None = None

    @property
    def usable(self) -> bool:
        """Not quarantined, and its file (patch) or directory (bundle) is on disk."""
        if self.quarantined is not None:
            return False
        return Path(self.path).is_file() if self.kind == "patch" else Path(self.path).is_dir()


_A = "id, kind, name, version, bundle_sha256, base_sha256, path, size, made_from, quarantined, quarantine_reason"


@dataclass(frozen=True)
class RolloutRow:
    id: str
    created: float
    status: str            # running | paused | aborting | done | aborted
    version: str
    bundle_sha256: str
    policy: dict[str, Any]
    selector: dict[str, Any]
    waves: int
    wave: int
    wave_started: float | None
    reason: str | None
    figures: dict[str, Any]
    finished: float | None
    artifact_id: str | None = None   # the artifact it was made from (None: rollbacks, older registries)
    soak_started: float | None = None   # when the current wave finished and its soak began
    paused_at: float | None = None
    keep_updated: bool = False          # an operator's abort that leaves applied devices on the new version


@dataclass(frozen=True)
class SlotRow:
    device_id: str
    wave: int
    status: str
    reason: str | None
    from_sha256: str | None
    from_version: str | None
    conf_before: float | None
    conf_after: float | None
    offered: float | None
    updated: float | None
    acc_before: float | None = None
    acc_after: float | None = None


@dataclass(frozen=True)
class Desired:
    device_id: str
    bundle_sha256: str
    version: str
    rollout_id: str | None
    set_at: float


class RolloutStore:
    def __init__(self, db: Database, artifacts_dir: str | Path, *, create: bool = True) -> None:
        self.db = as_database(db)
        if create:
            migrate(self.db, "rollouts", MIGRATIONS)
        self.artifacts_dir = Path(artifacts_dir)

    @classmethod
    def open(cls, db_url: str, artifacts_dir: str | Path | None = None) -> "RolloutStore":
        """``artifacts_dir`` defaults to ``artifacts/`` beside an SQLite file (a PostgreSQL URL needs one)."""
        if artifacts_dir is None:
            artifacts_dir = Path(db_url).parent / "artifacts"
        return cls(connect(db_url), artifacts_dir)

    @classmethod
    def reader(cls, db: Database, artifacts_dir: str | Path = "artifacts") -> "RolloutStore | None":
        """Reads over a read-only connection (the CLI's registry); None before the first rollout made the tables."""
        return cls(db, artifacts_dir, create=False) if has_table(db, "desired") else None

    def refresh(self) -> None:
        """See what other connections (``fleetctl serve``) committed since the last read."""
        end_read(self.db)

    def commit(self) -> None:
        self.db.commit()

    # -- artifacts -----------------------------------------------------------
    def add_bundle(self, src: str | Path) -> Artifact:
        """Copy a bundle directory into the artifact store (once per bundle id)."""
        from protocol.patch import bundle_id, read_manifest

        src = Path(src)
        m = read_manifest(src)
        bid = bundle_id(src)
        have = self.artifact(bid)
        if have is not None and Path(have.path).is_dir():
            return have
        dst = self.artifacts_dir / "bundles" / bid
        tmp = dst.with_name(f".{bid}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        size = 0
        for n in ["manifest.json", *m["files"]]:
            (tmp / n).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / n, tmp / n)
            size += (tmp / n).stat().st_size
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
        return self._record(Artifact(bid, "bundle", m.get("name"), m["version"], bid, None, str(dst), size))

    def add_patch(self, data: bytes, made_from: str | None = None) -> Artifact:
        """Store a patch file (signed by whoever made it; agents verify) under the SHA-256 of its bytes.
        The same bytes again return the stored artifact as it is (quarantined included)."""
        import hashlib

        from protocol.patch import parse_patch

        pm, _ = parse_patch(data)
        pid = hashlib.sha256(data).hexdigest()
        have = self.artifact(pid)
        if have is not None and Path(have.path).is_file():
            return have
        dst = self.artifacts_dir / "patches" / f"{pid}.efp"
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{pid}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, dst)
        base = (pm.get("base") or {}).get("bundle_sha256")
        return self._record(Artifact(pid, "patch", pm.get("name"), pm["target"]["version"],
                                     pm["target"]["bundle_sha256"], base, str(dst), len(data), made_from))

    def _record(self, a: Artifact) -> Artifact:
        # never INSERT OR REPLACE: that would clear a quarantine mark when the same bytes come back
        self.db.execute("INSERT INTO artifacts(id, kind, name, version, bundle_sha256, base_sha256, path, size, "
                        "created, made_from) VALUES(?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
                        "path=excluded.path, size=excluded.size",
                        (a.id, a.kind, a.name, a.version, a.bundle_sha256, a.base_sha256, a.path, a.size, time.time(),
                         a.made_from))
        self.db.commit()
        return self.artifact(a.id) or a

    def artifact(self, aid: str) -> Artifact | None:
        r = self.db.execute(f"SELECT {_A} FROM artifacts WHERE id=?", (aid,)).fetchone()
        return Artifact(*r) if r else None

    def artifacts_for(self, bundle_sha256: str) -> list[Artifact]:
        """Every artifact that produces this bundle, smallest first (quarantined ones too: filter on ``usable``)."""
        return [Artifact(*r) for r in self.db.execute(
            f"SELECT {_A} FROM artifacts WHERE bundle_sha256=? ORDER BY size, created", (bundle_sha256,))]

    def artifact_by_version(self, version: str) -> Artifact | None:
        r = self.db.execute(f"SELECT {_A} FROM artifacts WHERE version=? AND quarantined IS NULL "
                            "ORDER BY kind, created DESC LIMIT 1", (version,)).fetchone()
        return Artifact(*r) if r else None

    def artifact_by_transfer(self, transfer_id: str) -> Artifact | None:
        r = self.db.execute(f"SELECT {_A} FROM artifacts WHERE kind='patch' AND substr(id, 1, 32)=?",
                            (transfer_id,)).fetchone()
        return Artifact(*r) if r else None

    def quarantine(self, aid: str, reason: str) -> bool:
        """Mark an artifact as never to be offered again; False when it already was (or is unknown)."""
        cur = self.db.execute("UPDATE artifacts SET quarantined=?, quarantine_reason=? "
                              "WHERE id=? AND quarantined IS NULL", (time.time(), reason[:500], aid))
        return cur.rowcount > 0

    def quarantined_for(self, bundle_sha256: str) -> list[Artifact]:
        return [Artifact(*r) for r in self.db.execute(
            f"SELECT {_A} FROM artifacts WHERE bundle_sha256=? AND quarantined IS NOT NULL ORDER BY quarantined",
            (bundle_sha256,))]

    # -- rollouts ---------------------------------------------------------------
    def create_rollout(self, rid: str, version: str, bundle_sha256: str, policy: dict[str, Any],
                       selector: dict[str, Any], waves: list[list[str]],
                       current: dict[str, tuple[str | None, str | None]], artifact_id: str | None = None) -> None:
        now = time.time()
        with transaction(self.db):   # the service never sees a rollout without its slots
            self.db.execute("INSERT INTO rollouts(id, created, status, version, bundle_sha256, policy, selector, "
                            "waves, updated, artifact_id) VALUES(?,?,?,?,?,?,?,?,?,?)",
                            (rid, now, "running", version, bundle_sha256, json.dumps(policy), json.dumps(selector),
                             len(waves), now, artifact_id))
            for w, devs in enumerate(waves):
                for d in devs:
                    sha, ver = current.get(d, (None, None))
                    self.db.execute("INSERT INTO rollout_devices(rollout_id, device_id, wave, status, from_sha256, "
                                    "from_version, updated) VALUES(?,?,?,?,?,?,?)",
                                    (rid, d, w, "pending", sha, ver, now))

    _R = ("id, created, status, version, bundle_sha256, policy, selector, waves, wave, wave_started, reason, "
          "figures, finished, artifact_id, soak_started, paused_at, keep_updated")

    def _rollout(self, r: Iterable[Any]) -> RolloutRow:
        (id_, created, status, version, sha, policy, selector, waves, wave, ws, reason, figures, fin, aid,
         soak, paused, keep) = r
        selector = json.loads(selector)
        return RolloutRow(id_, created, status, version, sha, json.loads(policy), selector, waves, wave,
                          ws, reason, json.loads(figures) if figures else {}, fin,
                          aid or selector.get("artifact"),   # deploys before the column: the selector has it
                          soak, paused, bool(keep))

    def rollout(self, rid: str) -> RolloutRow | None:
        r = self.db.execute(f"SELECT {self._R} FROM rollouts WHERE id=?", (rid,)).fetchone()
        return self._rollout(r) if r else None

    def rollouts(self, status: str | None = None, limit: int = 50) -> list[RolloutRow]:
        q, args = f"SELECT {self._R} FROM rollouts", []
        if status:
            q += " WHERE status=?"
            args.append(status)
        q += " ORDER BY created DESC LIMIT ?"
        args.append(limit)
        return [self._rollout(r) for r in self.db.execute(q, args)]

    def update_rollout(self, rid: str, expect: tuple[str, ...] | None = None, **fields: Any) -> bool:
        """Set fields; with ``expect``, only while the rollout's status is one of those (the runner's
        writes never undo an operator's pause or abort made meanwhile). True when a row changed."""
        if "figures" in fields:
            fields["figures"] = json.dumps(fields["figures"])
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        q, args = f"UPDATE rollouts SET {cols} WHERE id=?", [*fields.values(), rid]
        if expect:
            q += f" AND status IN ({','.join('?' * len(expect))})"
            args += list(expect)
        return self.db.execute(q, args).rowcount > 0

    # -- operator control: persisted before anything acts on it (the runner reads it every tick) --
    def pause(self, rid: str, now: float | None = None) -> bool:
        """Hold the rollout: no wave is released, no wave timeout or soak runs out while paused."""
        with transaction(self.db):
            return self.db.execute("UPDATE rollouts SET status='paused', paused_at=?, updated=? "
                                   "WHERE id=? AND status='running'",
                                   (now or time.time(), time.time(), rid)).rowcount > 0

    def resume(self, rid: str, now: float | None = None) -> bool:
        """Carry on where it was paused: the wave's clocks (timeout, soak) move on by the pause."""
        now = now or time.time()
        with transaction(self.db):
            return self.db.execute(
                "UPDATE rollouts SET status='running', wave_started=wave_started + (? - paused_at), "
                "soak_started=soak_started + (? - paused_at), paused_at=NULL, updated=? "
                "WHERE id=? AND status='paused'", (now, now, time.time(), rid)).rowcount > 0

    def request_abort(self, rid: str, reason: str, keep_updated: bool = False) -> bool:
        """Mark the rollout ``aborting``; ``fleetctl serve`` carries the abort out (and again after a
        restart, until it is ``aborted``)."""
        with transaction(self.db):
            return self.db.execute("UPDATE rollouts SET status='aborting', reason=?, keep_updated=?, updated=? "
                                   "WHERE id=? AND status IN ('running', 'paused')",
                                   (reason, 1 if keep_updated else 0, time.time(), rid)).rowcount > 0

    def slots(self, rid: str) -> list[SlotRow]:
        return [SlotRow(*r) for r in self.db.execute(
            "SELECT device_id, wave, status, reason, from_sha256, from_version, conf_before, conf_after, offered, "
            "updated, acc_before, acc_after FROM rollout_devices WHERE rollout_id=? ORDER BY wave, device_id",
            (rid,))]

    def slot(self, rid: str, device_id: str) -> SlotRow | None:
        r = self.db.execute("SELECT device_id, wave, status, reason, from_sha256, from_version, conf_before, "
                            "conf_after, offered, updated, acc_before, acc_after FROM rollout_devices "
                            "WHERE rollout_id=? AND device_id=?",
                            (rid, device_id)).fetchone()
        return SlotRow(*r) if r else None

    def update_slot(self, rid: str, device_id: str, **fields: Any) -> None:
        fields["updated"] = time.time()
        cols = ", ".join(f"{k}=?" for k in fields)
        self.db.execute(f"UPDATE rollout_devices SET {cols} WHERE rollout_id=? AND device_id=?",
                        (*fields.values(), rid, device_id))

    # -- desired versions ----------------------------------------------------------
    def set_desired(self, device_id: str, bundle_sha256: str, version: str, rollout_id: str | None) -> None:
        self.db.execute("INSERT INTO desired VALUES(?,?,?,?,?) ON CONFLICT(device_id) DO UPDATE SET "
                        "bundle_sha256=excluded.bundle_sha256, version=excluded.version, "
                        "rollout_id=excluded.rollout_id, set_at=excluded.set_at",
                        (device_id, bundle_sha256, version, rollout_id, time.time()))

    def desired(self, device_id: str | None = None) -> list[Desired]:
        if device_id:
            rows = self.db.execute("SELECT * FROM desired WHERE device_id=?", (device_id,))
        else:
            rows = self.db.execute("SELECT * FROM desired ORDER BY device_id")
        return [Desired(*r) for r in rows]

    def needing_attention(self, in_progress: tuple[str, ...]) -> list[Desired]:
        """Desired rows of online devices that report another bundle, or whose rollout slot is still
        in progress: one query, so a large quiet fleet costs nothing per tick (registry tables)."""
        marks = ",".join("?" * len(in_progress))
        rows = self.db.execute(
            "SELECT d.device_id, d.bundle_sha256, d.version, d.rollout_id, d.set_at FROM desired d "
            "JOIN devices v ON v.id = d.device_id WHERE v.online = 1 AND ("
            "COALESCE(v.bundle_sha256, '') != d.bundle_sha256 OR EXISTS("
            f"SELECT 1 FROM rollout_devices r WHERE r.device_id = d.device_id AND r.status IN ({marks}) AND "
            "(r.rollout_id = d.rollout_id OR substr(d.rollout_id, 1, length(r.rollout_id) + 1) = r.rollout_id || ':'))) "
            "ORDER BY d.device_id",
            in_progress)
        return [Desired(*r) for r in rows]

    # -- tags ----------------------------------------------------------------------
    def tag(self, device_id: str, tag: str, remove: bool = False) -> None:
        if remove:
            self.db.execute("DELETE FROM device_tags WHERE device_id=? AND tag=?", (device_id, tag))
        else:
            self.db.execute("INSERT INTO device_tags VALUES(?,?) ON CONFLICT(device_id, tag) DO NOTHING",
                            (device_id, tag))
        self.db.commit()

    def tags(self, device_id: str | None = None) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        q = "SELECT device_id, tag FROM device_tags"
        rows = self.db.execute(q + " WHERE device_id=? ORDER BY tag", (device_id,)) if device_id \
            else self.db.execute(q + " ORDER BY device_id, tag")
        for d, t in rows:
            out.setdefault(d, []).append(t)
        return out

    def devices_with_tag(self, tag: str) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT device_id FROM device_tags WHERE tag=? ORDER BY device_id",
                                              (tag,))]
