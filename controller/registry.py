"""The device registry: SQLite (WAL), written only by the controller service.

Telemetry and events are keyed by message id, so a message that arrives twice (an
agent draining its outbox after an outage, a QoS 1 redelivery) is stored once.
The CLI opens the same file read-only.
"""
from __future__ import annotations

from dataclasses import dataclass
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

from protocol.envelope import Envelope

from .db import DatabaseMissing, connect, ensure_schema, has_table

SCHEMA = """
CREATE TABLE IF NOT EXISTS devices(
    id TEXT PRIMARY KEY, grp TEXT, online INTEGER NOT NULL DEFAULT 0,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL, status_changed REAL,
    state TEXT, telemetry TEXT, telemetry_ts REAL);
CREATE TABLE IF NOT EXISTS telemetry(
    msg_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, ts REAL NOT NULL, received REAL NOT NULL,
    body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS telemetry_dev_ts ON telemetry(device_id, ts);
CREATE TABLE IF NOT EXISTS events(
    msg_id TEXT PRIMARY KEY, device_id TEXT NOT NULL, ts REAL NOT NULL, received REAL NOT NULL,
    event TEXT NOT NULL, level TEXT, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_dev_ts ON events(device_id, ts);
CREATE TABLE IF NOT EXISTS rejects(reason TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS results(device_id TEXT PRIMARY KEY, ts REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
"""

# Key metrics shown in `fleetctl devices`, picked from the last telemetry body.
KEY_METRICS = ("cpu_percent", "mem_used_percent", "rss_mb", "temperature_c")


class RegistryError(RuntimeError):
    pass


@dataclass(frozen=True)
class Device:
    id: str
    group: str | None
    online: bool
    first_seen: float
    last_seen: float
    status_changed: float | None
    state: dict[str, Any] | None
    telemetry: dict[str, Any] | None
    telemetry_ts: float | None

    @property
    def model(self) -> str | None:
        m = (self.state or {}).get("model")
        if isinstance(m, dict):
            return f"{m.get('name')}@{m.get('version')}"
        return m if isinstance(m, str) else None

    def key_metrics(self) -> dict[str, Any]:
        t = self.telemetry or {}
        return {k: t.get(k) for k in KEY_METRICS}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "online": self.online, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "status_changed": self.status_changed, "model": self.model,
                "metrics": self.key_metrics(), "state": self.state, "telemetry": self.telemetry,
                "telemetry_ts": self.telemetry_ts}


class Registry:
    def __init__(self, path: str | Path, *, readonly: bool = False,
                 telemetry_keep: int = 1000, events_keep: int = 1000) -> None:
        self.path = str(path)
        self.telemetry_keep = telemetry_keep
        self.events_keep = events_keep
        if readonly:
            try:
                self.db = connect(self.path, readonly=True, timeout=5)
            except DatabaseMissing:
                raise RegistryError(f"no registry at {self.path} (is `fleetctl serve` running with this --db?)") from None
            try:
                ok = has_table(self.db, "devices")
            except sqlite3.DatabaseError as exc:
                raise RegistryError(f"{self.path} is not a registry: {exc}") from None
            if not ok:
                raise RegistryError(f"registry {self.path} is not initialised yet (fleetctl serve creates it)")
        else:
            self.db = connect(self.path, timeout=5)
            ensure_schema(self.db, SCHEMA)
        self._since_prune = 0

    def close(self) -> None:
        self.db.close()

    def commit(self) -> None:
        self.db.commit()

    # -- writes (service only) -------------------------------------------
    def _touch(self, device_id: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO devices(id, first_seen, last_seen) VALUES(?,?,?) "
            "ON CONFLICT(id) DO UPDATE SET last_seen=MAX(last_seen, excluded.last_seen)",
            (device_id, now, now))

    def record_state(self, env: Envelope, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._touch(env.sender, now)
        online = 1 if env.body.get("status") == "online" else 0
        self.db.execute(
            "UPDATE devices SET online=?, status_changed=?, grp=COALESCE(?, grp), "
            "state=CASE WHEN ?=1 THEN ? ELSE state END WHERE id=?",
            (online, now, env.body.get("group"), online, json.dumps(dict(env.body)), env.sender))

    def record_telemetry(self, env: Envelope, now: float | None = None) -> bool:
        """Store telemetry; False if this message id was already stored (duplicate)."""
        now = time.time() if now is None else now
        cur = self.db.execute(
            "INSERT OR IGNORE INTO telemetry(msg_id, device_id, ts, received, body) VALUES(?,?,?,?,?)",
            (env.id, env.sender, env.ts, now, json.dumps(dict(env.body))))
        if cur.rowcount == 0:
            return False
        self._touch(env.sender, now)
        self.db.execute(
            "UPDATE devices SET telemetry=?, telemetry_ts=? WHERE id=? AND (telemetry_ts IS NULL OR telemetry_ts<=?)",
            (json.dumps(dict(env.body)), env.ts, env.sender, env.ts))
        self._maybe_prune()
        return True

    def record_event(self, env: Envelope, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        cur = self.db.execute(
            "INSERT OR IGNORE INTO events(msg_id, device_id, ts, received, event, level, body) VALUES(?,?,?,?,?,?,?)",
            (env.id, env.sender, env.ts, now, env.body.get("event"), env.body.get("level"),
             json.dumps(dict(env.body))))
        if cur.rowcount == 0:
            return False
        self._touch(env.sender, now)
        return True

    def record_result(self, env: Envelope) -> None:
        """Keep the last results summary per device (dashboards subscribe for the stream)."""
        if env.body.get("type") != "summary":
            return
        self.db.execute("INSERT INTO results(device_id, ts, body) VALUES(?,?,?) ON CONFLICT(device_id) DO UPDATE "
                        "SET ts=excluded.ts, body=excluded.body WHERE excluded.ts >= results.ts",
                        (env.sender, env.ts, json.dumps(dict(env.body))))

    def last_results(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {"ts": r[1], **json.loads(r[2])} for r in self.db.execute("SELECT device_id, ts, body FROM results")}

    def mark_offline(self, device_id: str, now: float | None = None) -> None:
        self.db.execute("UPDATE devices SET online=0, status_changed=? WHERE id=? AND online=1",
                        (time.time() if now is None else now, device_id))

    def count_reject(self, reason: str, n: int = 1) -> None:
        self.db.execute("INSERT INTO rejects(reason, count) VALUES(?,?) "
                        "ON CONFLICT(reason) DO UPDATE SET count=count+excluded.count", (reason, n))

    def _maybe_prune(self) -> None:
        self._since_prune += 1
        if self._since_prune < 500:
            return
        self._since_prune = 0
        for table, keep in (("telemetry", self.telemetry_keep), ("events", self.events_keep)):
            self.db.execute(
                f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER "
                f"(PARTITION BY device_id ORDER BY ts DESC) AS rn FROM {table}) WHERE rn > ?)", (keep,))

    # -- reads -----------------------------------------------------------
    @staticmethod
    def _device(row: Iterable[Any]) -> Device:
        (id_, grp, online, first, last, changed, state, tel, tel_ts) = row
        return Device(id_, grp, bool(online), first, last, changed,
                      json.loads(state) if state else None, json.loads(tel) if tel else None, tel_ts)

    _DEV_COLS = "id, grp, online, first_seen, last_seen, status_changed, state, telemetry, telemetry_ts"

    def devices(self) -> list[Device]:
        return [self._device(r) for r in self.db.execute(f"SELECT {self._DEV_COLS} FROM devices ORDER BY id")]

    def device(self, device_id: str) -> Device | None:
        row = self.db.execute(f"SELECT {self._DEV_COLS} FROM devices WHERE id=?", (device_id,)).fetchone()
        return self._device(row) if row else None

    def telemetry(self, device_id: str | None = None, limit: int = 20, after_rowid: int = 0) -> list[dict[str, Any]]:
        q = "SELECT rowid, msg_id, device_id, ts, body FROM telemetry WHERE rowid > ?"
        args: list[Any] = [after_rowid]
        if device_id:
            q += " AND device_id=?"
            args.append(device_id)
        q += " ORDER BY rowid DESC LIMIT ?"
        args.append(limit)
        rows = self.db.execute(q, args).fetchall()
        return [{"rowid": r[0], "id": r[1], "device": r[2], "ts": r[3], "body": json.loads(r[4])}
                for r in reversed(rows)]

    def telemetry_count(self, device_id: str | None = None) -> int:
        if device_id:
            return self.db.execute("SELECT COUNT(*) FROM telemetry WHERE device_id=?", (device_id,)).fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM telemetry").fetchone()[0]

    def events(self, device_id: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = "SELECT msg_id, device_id, ts, event, level, body FROM events"
        args: list[Any] = []
        if device_id:
            q += " WHERE device_id=?"
            args.append(device_id)
        q += " ORDER BY ts DESC LIMIT ?"
        args.append(limit)
        return [{"id": r[0], "device": r[1], "ts": r[2], "event": r[3], "level": r[4], "body": json.loads(r[5])}
                for r in reversed(self.db.execute(q, args).fetchall())]

    def rejects(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT reason, count FROM rejects ORDER BY reason").fetchall())
