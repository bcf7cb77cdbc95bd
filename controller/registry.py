"""The device registry: SQLite (embedded) or PostgreSQL (production), through controller/db.py.

Telemetry and events are keyed by message id, so a message that arrives twice (an agent draining
its outbox after an outage, a QoS 1 redelivery, a batch retried after the database went away) is
stored once. Ingest cost does not grow with the registry:

* writes come in batches (``write``; controller/ingest.py runs them on a writer thread): one
  INSERT per message, one device upsert per device per batch, one duplicate check per batch;
* a body is serialised once (compact JSON, zstd: controller/bodycodec.py) and that blob is both the
  history row and the device's latest sample;
* retention is per device, by count AND age, with bounded work: each device is pruned once per
  ``prune_every`` of its messages (one index range: its own rows), never a window over the table;
* list views read the compact columns (``summaries``), never the JSON.

The CLI opens the same registry read-only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import functools
import json
import random
import time
from typing import Any, Iterable, NamedTuple, Sequence

from protocol.envelope import Envelope

from .bodycodec import BodyCodec, dumps, train
from .db import Database, DatabaseMissing, DatabaseUnavailable, baseline, connect, migrate

# the schema before versioned migrations (registries made by earlier releases are exactly this)
SCHEMA_V1 = """
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

# Key metrics shown in `fleetctl devices`, picked from the last telemetry body (columns of devices).
KEY_METRICS = ("cpu_percent", "mem_used_percent", "rss_mb", "temperature_c")


def _v2_telemetry(db: Database) -> None:
    """telemetry gets an integer key (the ``--follow`` cursor, no rowid) and a BLOB body."""
    db.script("CREATE TABLE telemetry_new(id AUTO_ID, msg_id TEXT NOT NULL, device_id TEXT NOT NULL, "
              "ts REAL NOT NULL, received REAL NOT NULL, body BLOB NOT NULL)")
    if db.backend == "sqlite":   # PostgreSQL registries start at this version: there is nothing to carry over
        db.execute("INSERT INTO telemetry_new(msg_id, device_id, ts, received, body) "
                   "SELECT msg_id, device_id, ts, received, body FROM telemetry ORDER BY ts")
    db.script("DROP TABLE telemetry; ALTER TABLE telemetry_new RENAME TO telemetry;"
              "CREATE UNIQUE INDEX telemetry_msg ON telemetry(msg_id);"
              "CREATE INDEX telemetry_dev_ts ON telemetry(device_id, ts)")


def _v3_device_columns(db: Database) -> None:
    """What list views show, as columns (no JSON parsed to list 10,000 devices), filled from the JSON."""
    if db.backend == "postgres":   # the latest sample becomes a body blob (SQLite's columns take either)
        db.script("ALTER TABLE devices ALTER COLUMN telemetry TYPE BYTEA USING convert_to(telemetry, 'UTF8')")
    have = db.columns("devices")
    for col, typ in (("model", "TEXT"), ("bundle_sha256", "TEXT"), *((k, "REAL") for k in KEY_METRICS)):
        if col not in have:
            db.script(f"ALTER TABLE devices ADD COLUMN {col} {typ}")
    codec = BodyCodec()
    rows = db.execute("SELECT id, state, telemetry FROM devices").fetchall()
    for id_, state, tel in rows:
        st = json.loads(state) if state else {}
        t = codec.decode(tel) or {}
        db.execute("UPDATE devices SET model=?, bundle_sha256=?, cpu_percent=?, mem_used_percent=?, rss_mb=?, "
                   "temperature_c=? WHERE id=?", (_model(st), _bundle(st), *_metrics(t), id_))


MIGRATIONS = [
    baseline(SCHEMA_V1),
    _v2_telemetry,
    _v3_device_columns,
    "CREATE TABLE IF NOT EXISTS body_dicts(dict_id INTEGER PRIMARY KEY, kind TEXT NOT NULL, created REAL NOT NULL, "
    "data BLOB NOT NULL)",
    # the site a board reports being behind (docs/sites.md): rollouts wave by it, --site selects by it
    "ALTER TABLE devices ADD COLUMN site TEXT",
]


class RegistryError(RuntimeError):
    pass


def _model(state: dict[str, Any]) -> str | None:
    m = state.get("model")
    if isinstance(m, dict):
        return f"{m.get('name')}@{m.get('version')}"
    return m if isinstance(m, str) else None


def _bundle(state: dict[str, Any]) -> str | None:
    m = state.get("model")
    b = m.get("bundle_sha256") if isinstance(m, dict) else None
    return b if isinstance(b, str) else None


def _metrics(t: Any) -> tuple[float | None, ...]:
    out = []
    for k in KEY_METRICS:   # a plain loop: this runs for every sample stored
        v = t.get(k)
        out.append(v if type(v) in (int, float) else None)   # not bool, not a string
    return tuple(out)


class DeviceSummary(NamedTuple):
    """What list views show: read from columns only (a tuple: 10,000 of them are built per listing)."""
    id: str
    group: str | None
    online: bool
    last_seen: float
    model: str | None
    metrics: tuple[float | None, ...]
    site: str | None = None

    def key_metrics(self) -> dict[str, Any]:
        return dict(zip(KEY_METRICS, self.metrics))


@dataclass(frozen=True)
class Device:
    id: str
    group: str | None
    online: bool
    first_seen: float
    last_seen: float
    status_changed: float | None
    state_raw: str | None = field(repr=False)
    telemetry_raw: Any = field(repr=False)
    telemetry_ts: float | None
    codec: BodyCodec | None = field(default=None, repr=False, compare=False)
    site: str | None = None

    @functools.cached_property
    def state(self) -> dict[str, Any] | None:
        return json.loads(self.state_raw) if self.state_raw else None

    @functools.cached_property
    def telemetry(self) -> dict[str, Any] | None:
        return (self.codec or BodyCodec()).decode(self.telemetry_raw) if self.telemetry_raw else None

    @property
    def model(self) -> str | None:
        return _model(self.state or {})

    def key_metrics(self) -> dict[str, Any]:
        t = self.telemetry or {}
        return {k: t.get(k) for k in KEY_METRICS}

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "group": self.group, "online": self.online, "first_seen": self.first_seen,
                "last_seen": self.last_seen, "status_changed": self.status_changed, "model": self.model,
                "metrics": self.key_metrics(), "site": self.site, "state": self.state, "telemetry": self.telemetry,
                "telemetry_ts": self.telemetry_ts}


@dataclass
class WriteResult:
    """What one ``write`` stored: counts per kind, and duplicates (message ids already stored)."""
    stored: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    pruned: int = 0


_DEVICE_TELEMETRY_UPSERT = (
    "INSERT INTO devices(id, first_seen, last_seen, telemetry, telemetry_ts, cpu_percent, mem_used_percent, rss_mb, "
    "temperature_c) VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
    "last_seen=CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen ELSE devices.last_seen END"
    + "".join(f", {c}=CASE WHEN devices.telemetry_ts IS NULL OR devices.telemetry_ts <= excluded.telemetry_ts "
              f"THEN excluded.{c} ELSE devices.{c} END"
              for c in ("telemetry", "cpu_percent", "mem_used_percent", "rss_mb", "temperature_c"))
    + ", telemetry_ts=CASE WHEN devices.telemetry_ts IS NULL OR devices.telemetry_ts <= excluded.telemetry_ts "
      "THEN excluded.telemetry_ts ELSE devices.telemetry_ts END")

_DEVICE_STATE_UPSERT = (
    "INSERT INTO devices(id, first_seen, last_seen, online, status_changed, grp, state, model, bundle_sha256, site) "
    "VALUES(?,?,?,?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET "
    "last_seen=CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen ELSE devices.last_seen END, "
    "online=excluded.online, status_changed=excluded.status_changed, grp=COALESCE(excluded.grp, devices.grp), "
    "state=CASE WHEN excluded.online=1 THEN excluded.state ELSE devices.state END, "
    "model=CASE WHEN excluded.online=1 THEN excluded.model ELSE devices.model END, "
    "bundle_sha256=CASE WHEN excluded.online=1 THEN excluded.bundle_sha256 ELSE devices.bundle_sha256 END, "
    # an online state says where the board is now (no site: none); a will or offline keeps what was known
    "site=CASE WHEN excluded.online=1 THEN excluded.site ELSE COALESCE(excluded.site, devices.site) END")

_TOUCH = ("INSERT INTO devices(id, first_seen, last_seen) VALUES(?,?,?) ON CONFLICT(id) DO UPDATE SET "
          "last_seen=CASE WHEN excluded.last_seen > devices.last_seen THEN excluded.last_seen ELSE devices.last_seen END")


class Registry:
    """``url``: ``postgresql://…``, ``sqlite:///path`` or a file path. ``telemetry_keep`` /
    ``events_keep``: samples kept per device; ``*_max_age_s``: and none older (0 = no age limit)."""

    def __init__(self, url: str, *, readonly: bool = False, telemetry_keep: int = 1000, events_keep: int = 1000,
                 telemetry_max_age_s: float = 0.0, events_max_age_s: float = 0.0, prune_every: int = 0,
                 train_after: int = 2000) -> None:
        self.path = str(url)
        self.telemetry_keep = telemetry_keep
        self.events_keep = events_keep
        self.max_age = {"telemetry": telemetry_max_age_s, "events": events_max_age_s}
        # prune a device once per this many of its messages: work per message O(keep / prune_every)
        self.prune_every = prune_every or max(10, min(telemetry_keep, events_keep) // 10)
        self._since_prune: dict[tuple[str, str], int] = {}
        self._train_after = train_after
        self._samples: list[bytes] = []
        self.codec = BodyCodec(self._load_dict)
        try:
            self.db = connect(self.path, readonly=readonly, timeout=5)
        except DatabaseMissing:
            raise RegistryError(f"no registry at {self.path} (is `fleetctl serve` running with this --db?)") from None
        except DatabaseUnavailable as exc:
            raise RegistryError(str(exc)) from None
        if readonly:
            try:
                ok = self.db.has_table("devices")
            except self.db.errors as exc:
                raise RegistryError(f"{self.path} is not a registry: {exc}") from None
            if not ok:
                raise RegistryError(f"registry {self.path} is not initialised yet (fleetctl serve creates it)")
        else:
            migrate(self.db, "registry", MIGRATIONS)
            self._load_current_dict()

    @property
    def backend(self) -> str:
        return self.db.backend

    def close(self) -> None:
        self.db.close()

    def commit(self) -> None:
        self.db.commit()

    def rollback(self) -> None:
        self.db.rollback()

    # -- body dictionaries -------------------------------------------------
    def _load_dict(self, dict_id: int) -> bytes | None:
        if not self.db.has_table("body_dicts"):
            return None
        r = self.db.execute("SELECT data FROM body_dicts WHERE dict_id=?", (dict_id,)).fetchone()
        return bytes(r[0]) if r else None

    def _load_current_dict(self) -> None:
        r = self.db.execute("SELECT data FROM body_dicts WHERE kind='telemetry' ORDER BY created DESC LIMIT 1"
                            ).fetchone()
        if r:
            self.codec.use_dict(bytes(r[0]))
            self._train_after = 0

    def _maybe_train(self, raw: bytes) -> None:
        """Once, after ``train_after`` samples: a dictionary from this fleet's own telemetry (stored
        first, in the same transaction as the rows it compresses)."""
        if not self._train_after:
            return
        self._samples.append(raw)
        if len(self._samples) < self._train_after:
            return
        try:
            data = train(self._samples)
        except Exception:  # noqa: BLE001 - too few distinct samples: go on without a dictionary
            self._samples.clear()
            return
        self._samples, self._train_after = [], 0
        did = self.codec.use_dict(data)
        self.db.execute("INSERT INTO body_dicts(dict_id, kind, created, data) VALUES(?,?,?,?) "
                        "ON CONFLICT(dict_id) DO NOTHING", (did, "telemetry", time.time(), data))

    # -- writes (service only) ---------------------------------------------
    def write(self, envs: Sequence[tuple], rejects: dict[str, int] | None = None,
              now: float | None = None) -> WriteResult:
        """Store one batch of validated messages and reject counts. Items are ``(leaf, envelope)`` or
        ``(leaf, envelope, payload)`` (the bytes it was decoded from: stored as they are), in arrival
        order. Uncommitted: the caller commits, then acknowledges the messages."""
        now = time.time() if now is None else now
        res = WriteResult()
        tel = [(it[1], it[2] if len(it) > 2 else None) for it in envs if it[0] == "telemetry"]
        evs = [it[1] for it in envs if it[0] == "events"]
        for leaf, env, *_ in envs:
            if leaf == "state":
                self._state(env, now)
            elif leaf == "results":
                self._result(env)
            else:
                continue
            res.stored[leaf] = res.stored.get(leaf, 0) + 1
        if tel:
            n, dup = self._telemetry(tel, now, res)
            res.stored["telemetry"], res.duplicates = n, res.duplicates + dup
        if evs:
            n, dup = self._events(evs, now, res)
            res.stored["events"], res.duplicates = n, res.duplicates + dup
        for reason, count in (rejects or {}).items():
            self.count_reject(reason, count)
        return res

    def _fresh(self, table: str, envs: list, key=lambda e: e) -> tuple[list, int]:
        """Drop ids already stored (or twice in this batch): one query per batch."""
        ids = list({key(e).id for e in envs})
        have: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            have.update(r[0] for r in self.db.execute(
                f"SELECT msg_id FROM {table} WHERE msg_id IN ({','.join('?' * len(chunk))})", chunk))
        out, seen = [], set()
        for e in envs:
            mid = key(e).id
            if mid in have or mid in seen:
                continue
            seen.add(mid)
            out.append(e)
        return out, len(envs) - len(out)

    def _telemetry(self, envs: list[tuple[Envelope, bytes | None]], now: float, res: WriteResult) -> tuple[int, int]:
        fresh_pairs, dup = self._fresh("telemetry", envs, key=lambda p: p[0])
        fresh = [e for e, _ in fresh_pairs]
        rows, latest = [], {}
        for e, payload in fresh_pairs:
            if payload is not None:       # as received: no serialisation at all
                self._maybe_train(payload)
                blob = self.codec.compress_envelope(payload)
            else:
                raw = dumps(e.body)
                self._maybe_train(raw)
                blob = self.codec.compress(raw)
            rows.append((e.id, e.sender, e.ts, now, blob))
            cur = latest.get(e.sender)
            if cur is None or e.ts >= cur[4]:
                latest[e.sender] = (e.sender, now, now, blob, e.ts, *_metrics(e.body))
        if rows:
            self.db.executemany("INSERT INTO telemetry(msg_id, device_id, ts, received, body) VALUES(?,?,?,?,?) "
                                "ON CONFLICT(msg_id) DO NOTHING", rows)
            self.db.executemany(_DEVICE_TELEMETRY_UPSERT, list(latest.values()))
            for e in fresh:
                res.pruned += self._maybe_prune("telemetry", e.sender, now)
        return len(fresh), dup

    def _events(self, envs: list[Envelope], now: float, res: WriteResult) -> tuple[int, int]:
        fresh, dup = self._fresh("events", envs)
        if fresh:
            self.db.executemany(
                "INSERT INTO events(msg_id, device_id, ts, received, event, level, body) VALUES(?,?,?,?,?,?,?) "
                "ON CONFLICT(msg_id) DO NOTHING",
                [(e.id, e.sender, e.ts, now, e.body.get("event"), e.body.get("level"), dumps(e.body).decode())
                 for e in fresh])
            self.db.executemany(_TOUCH, [(d, now, now) for d in {e.sender for e in fresh}])
            for e in fresh:
                res.pruned += self._maybe_prune("events", e.sender, now)
        return len(fresh), dup

    def _state(self, env: Envelope, now: float) -> None:
        online = 1 if env.body.get("status") == "online" else 0
        body = dict(env.body)
        site = body.get("site")
        self.db.execute(_DEVICE_STATE_UPSERT, (env.sender, now, now, online, now, env.body.get("group"),
                                               dumps(body).decode(), _model(body), _bundle(body),
                                               site if isinstance(site, str) else None))

    def _result(self, env: Envelope) -> None:
        """Keep the last results summary per device (dashboards subscribe for the stream)."""
        if env.body.get("type") != "summary":
            return
        self.db.execute("INSERT INTO results(device_id, ts, body) VALUES(?,?,?) ON CONFLICT(device_id) DO UPDATE "
                        "SET ts=excluded.ts, body=excluded.body WHERE excluded.ts >= results.ts",
                        (env.sender, env.ts, dumps(env.body).decode()))

    # single-message forms (tests, the demo): the same SQL as a batch of one
    def record_state(self, env: Envelope, now: float | None = None) -> None:
        self.write([("state", env)], now=now)

    def record_telemetry(self, env: Envelope, now: float | None = None) -> bool:
        """Store telemetry; False if this message id was already stored (duplicate)."""
        return self.write([("telemetry", env)], now=now).duplicates == 0

    def record_event(self, env: Envelope, now: float | None = None) -> bool:
        return self.write([("events", env)], now=now).duplicates == 0

    def record_result(self, env: Envelope) -> None:
        self.write([("results", env)])

    def mark_offline(self, device_id: str, now: float | None = None) -> None:
        self.db.execute("UPDATE devices SET online=0, status_changed=? WHERE id=? AND online=1",
                        (time.time() if now is None else now, device_id))

    def count_reject(self, reason: str, n: int = 1) -> None:
        self.db.execute("INSERT INTO rejects(reason, count) VALUES(?,?) "
                        "ON CONFLICT(reason) DO UPDATE SET count=rejects.count+excluded.count", (reason, n))

    def set_meta(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO meta(key, value) VALUES(?,?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, json.dumps(value)))

    def meta(self, key: str) -> Any:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(r[0]) if r and r[0] else None

    # -- retention -------------------------------------------------------------
    def _maybe_prune(self, table: str, device_id: str, now: float) -> int:
        k = (table, device_id)
        left = self._since_prune.get(k)
        if left is None:   # first message of this device since start: prune soon, spread over devices
            left = random.randint(1, self.prune_every)
        left -= 1
        if left > 0:
            self._since_prune[k] = left
            return 0
        self._since_prune[k] = self.prune_every
        return self.prune_device(table, device_id, now)

    def prune_device(self, table: str, device_id: str, now: float | None = None) -> int:
        """Keep ``device_id``'s newest ``keep`` rows of ``table`` and none older than the max age: one
        walk of its own index range (at most keep + prune_every entries), whatever the table's size."""
        now = time.time() if now is None else now
        keep = self.telemetry_keep if table == "telemetry" else self.events_keep
        row = self.db.execute(f"SELECT ts FROM {table} WHERE device_id=? ORDER BY ts DESC LIMIT 1 OFFSET ?",
                              (device_id, keep)).fetchone()
        cut = row[0] if row else None
        if self.max_age[table]:
            age_cut = now - self.max_age[table]
            cut = age_cut if cut is None or age_cut > cut else cut
            if row is None:
                cur = self.db.execute(f"DELETE FROM {table} WHERE device_id=? AND ts < ?", (device_id, cut))
                return max(0, cur.rowcount)
        if cut is None:
            return 0
        cur = self.db.execute(f"DELETE FROM {table} WHERE device_id=? AND ts <= ?", (device_id, cut))
        return max(0, cur.rowcount)

    def prune_slice(self, after: str, limit: int = 100, now: float | None = None) -> tuple[str, int]:
        """Age retention for devices that went quiet (no message, so no per-message prune): the next
        ``limit`` devices by id after ``after``; returns the cursor to continue from ("" = wrapped)."""
        ids = [r[0] for r in self.db.execute("SELECT id FROM devices WHERE id > ? ORDER BY id LIMIT ?",
                                             (after, limit))]
        n = sum(self.prune_device(t, d, now) for d in ids for t in ("telemetry", "events") if self.max_age[t])
        return (ids[-1] if len(ids) == limit else ""), n

    # -- reads -----------------------------------------------------------------
    def _device(self, row: Iterable[Any]) -> Device:
        (id_, grp, online, first, last, changed, state, tel, tel_ts, site) = row
        return Device(id_, grp, bool(online), first, last, changed, state, tel, tel_ts, self.codec, site)

    _DEV_COLS = "id, grp, online, first_seen, last_seen, status_changed, state, telemetry, telemetry_ts, site"

    def devices(self) -> list[Device]:
        """Every device with its state and last telemetry (decoded when first used)."""
        return [self._device(r) for r in self.db.execute(f"SELECT {self._DEV_COLS} FROM devices ORDER BY id")]

    def summaries(self) -> list[DeviceSummary]:
        """What ``fleetctl devices`` shows, from columns only."""
        return [DeviceSummary(r[0], r[1], bool(r[2]), r[3], r[4], r[5:9], r[9]) for r in self.db.execute(
            "SELECT id, grp, online, last_seen, model, cpu_percent, mem_used_percent, rss_mb, temperature_c, site "
            "FROM devices ORDER BY id")]

    def silent_online(self, before: float) -> list[tuple[str, float]]:
        """Online devices not heard from since ``before`` (the offline sweep)."""
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT id, last_seen FROM devices WHERE online=1 AND last_seen < ?", (before,))]

    def device(self, device_id: str) -> Device | None:
        row = self.db.execute(f"SELECT {self._DEV_COLS} FROM devices WHERE id=?", (device_id,)).fetchone()
        return self._device(row) if row else None

    def telemetry(self, device_id: str | None = None, limit: int = 20, after_rowid: int = 0) -> list[dict[str, Any]]:
        """The newest ``limit`` samples after cursor ``after_rowid`` (the ``rowid`` key of a sample), oldest first."""
        q = "SELECT id, msg_id, device_id, ts, body FROM telemetry WHERE id > ?"
        args: list[Any] = [after_rowid]
        if device_id:
            q += " AND device_id=?"
            args.append(device_id)
        q += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        rows = self.db.execute(q, args).fetchall()
        return [{"rowid": r[0], "id": r[1], "device": r[2], "ts": r[3], "body": self.codec.decode(r[4])}
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

    def last_results(self) -> dict[str, dict[str, Any]]:
        return {r[0]: {"ts": r[1], **json.loads(r[2])} for r in self.db.execute("SELECT device_id, ts, body FROM results")}
