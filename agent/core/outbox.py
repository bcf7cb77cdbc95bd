"""The on-disk outbox: what cannot be published now waits here and is sent in order later.

One SQLite file in WAL mode under the state dir. ``put`` commits before it returns, so a
killed or crashed agent loses nothing it had put (tested with SIGKILL). With the default
``synchronous="normal"`` an OS crash or power cut may lose the last few puts since the last
WAL checkpoint but never corrupts the file; ``synchronous="full"`` fsyncs every put (see
bench/outbox.py for what that costs). A file that is not a database any more (a dying SD
card) is moved aside and a fresh outbox is started, so the agent still comes up.

Bounded in bytes (payload + topic + 32 per item), with a drop policy per kind
(``DropPolicy``; the default):

* ``telemetry`` is *thinned*: every other queued sample is dropped, oldest first, until there
  is room plus 5 % headroom (so a full outbox does not pay one scan per put). Repeated
  thinning leaves old data at an ever coarser step and recent data dense;
* ``result`` summaries are dropped *oldest* first after that (they are re-derivable);
* ``event``, ``update`` and ``reply`` are *never* dropped: when only they are left and there
  is no room, ``put`` raises ``OutboxFull`` — loud, counted, and the caller still holds the
  item. A new droppable item that finds no room is itself dropped and counted.

Every drop is counted by kind and reason (``stats()["dropped"]``). An optional ``msg_id``
(e.g. the envelope id) makes ``put`` idempotent: a second put with a queued id is ignored
and counted as ``duplicate``.

Threads: every method takes one lock, so one writer and one drainer thread may share an
``Outbox``; the agent uses it from its event-loop thread only (each call is a short local
SQLite transaction, well under a millisecond on a board, see bench/outbox.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

log = logging.getLogger(__name__)

KINDS = ("telemetry", "result", "event", "update", "reply")
ITEM_OVERHEAD = 32          # bytes charged per item on top of payload and topic
HEADROOM = 0.05             # fraction of max_bytes freed beyond the need when thinning/evicting


class OutboxFull(RuntimeError):
    """No room for an item that must never be dropped; the caller still holds it."""


@dataclass(frozen=True)
class DropPolicy:
    """Which kinds give way when the outbox is full, and how. Kinds in neither tuple are never dropped."""

    thin: tuple[str, ...] = ("telemetry",)
    oldest: tuple[str, ...] = ("result",)

    def __post_init__(self) -> None:
        for k in self.thin + self.oldest:
            if k not in KINDS:
                raise ValueError(f"drop policy names unknown kind {k!r}")
        if set(self.thin) & set(self.oldest):
            raise ValueError("a kind can be thinned or dropped oldest-first, not both")

    def action(self, kind: str) -> str:
        return "thin" if kind in self.thin else "oldest" if kind in self.oldest else "never"


DEFAULT_POLICY = DropPolicy()


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool
    msg_id: str | None = None
    created: float = field(default=0.0, compare=False)


_SCHEMA = ("CREATE TABLE IF NOT EXISTS outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
           "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
           "created REAL NOT NULL, size INTEGER NOT NULL, msg_id TEXT)")


class Outbox:
    def __init__(self, path: str | Path, max_bytes: int = 16 << 20, policy: DropPolicy = DEFAULT_POLICY,
                 synchronous: str = "normal") -> None:
        if max_bytes < 1024:
            raise ValueError(f"outbox max_bytes must be >= 1024, got {max_bytes}")
        if synchronous not in ("normal", "full"):
            raise ValueError(f"synchronous must be 'normal' or 'full', got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.policy = policy
        self.synchronous = synchronous
        self.recovered_from: Path | None = None   # where a corrupt file was moved, if one was
        self._lock = threading.Lock()
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("outbox %s is unreadable (%s); moved aside to %s, starting empty", self.path, exc, aside)
            for suffix in ("-wal", "-shm"):
                side = Path(str(self.path) + suffix)
                if side.exists():
                    os.replace(side, Path(str(aside) + suffix))
            os.replace(self.path, aside)
            self.recovered_from = aside
            self.db = self._open()
        self.dropped: dict[str, dict[str, int]] = {}
        self.refused = 0
        self.put_count = 0
        self.sent_count = 0
        self._count, self._bytes = (int(x) for x in self.db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone())

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), isolation_level=None, timeout=5, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            db.execute("PRAGMA journal_size_limit=4194304")  # truncate the WAL back to 4 MiB after checkpoints
            db.execute(_SCHEMA)
            cols = {r[1] for r in db.execute("PRAGMA table_info(outbox)")}
            if "msg_id" not in cols:  # an outbox written by an older agent
                db.execute("ALTER TABLE outbox ADD COLUMN msg_id TEXT")
            db.execute("CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id)")
            db.execute("CREATE UNIQUE INDEX IF NOT EXISTS outbox_msg_id ON outbox(msg_id) WHERE msg_id IS NOT NULL")
            db.execute("SELECT COUNT(*) FROM outbox").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # ---- reading

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        return self._bytes

    def peek(self, limit: int = 100) -> list[Item]:
        """The oldest ``limit`` items, in the order they were put. They stay until ``ack``."""
        if limit < 1:
            raise ValueError(f"peek limit must be >= 1, got {limit}")
        with self._lock:
            rows = self.db.execute("SELECT id, kind, topic, payload, qos, retain, msg_id, created FROM outbox "
                                   "ORDER BY id LIMIT ?", (limit,)).fetchall()
        return [Item(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), r[6], r[7]) for r in rows]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            by_kind = dict(self.db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
            return {"queued": self._count, "queued_by_kind": by_kind, "bytes": self._bytes,
                    "max_bytes": self.max_bytes, "put": self.put_count, "sent": self.sent_count,
                    "dropped": {k: dict(v) for k, v in self.dropped.items()}, "refused": self.refused}

    # ---- writing

    def put(self, kind: str, topic: str, payload: bytes, qos: int = 1, retain: bool = False,
            msg_id: str | None = None) -> None:
        """Keep one message for later. Raises OutboxFull only for a kind that is never dropped."""
        if kind not in KINDS:
            raise ValueError(f"unknown outbox kind {kind!r} (one of {', '.join(KINDS)})")
        if not isinstance(topic, str) or not topic:
            raise ValueError("outbox topic must be a non-empty string")
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise TypeError(f"outbox payload must be bytes, got {type(payload).__name__}")
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        payload = bytes(payload)
        size = len(payload) + len(topic.encode()) + ITEM_OVERHEAD
        action = self.policy.action(kind)
        with self._lock, self._transaction():
            if msg_id is not None and self.db.execute("SELECT 1 FROM outbox WHERE msg_id=?", (msg_id,)).fetchone():
                self._count_drop(kind, "duplicate")
                return
            if size > self.max_bytes:
                if action == "never":
                    self.refused += 1
                    raise OutboxFull(f"{kind} of {size} bytes is larger than the whole outbox ({self.max_bytes})")
                self._count_drop(kind, "too_large")
                return
            if not self._make_room(size):
                if action == "never":
                    self.refused += 1
                    raise OutboxFull(f"outbox full ({self._bytes} of {self.max_bytes} bytes, only items that are "
                                     f"never dropped left); new {kind} refused")
                self._count_drop(kind, "full")
                return
            self.db.execute("INSERT INTO outbox(kind, topic, payload, qos, retain, created, size, msg_id) "
                            "VALUES(?,?,?,?,?,?,?,?)",
                            (kind, topic, payload, qos, int(retain), time.time(), size, msg_id))
            self._bytes += size
            self._count += 1
            self.put_count += 1

    def ack(self, item_ids: Iterable[int]) -> int:
        """Remove items that were delivered; unknown ids are ignored. Returns how many left."""
        ids = [int(i) for i in item_ids]
        if not ids:
            return 0
        with self._lock, self._transaction():
            n, _ = self._delete(ids)
            self.sent_count += n
            return n

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One commit per put/ack (evictions included): one fsync with synchronous=full, and an
        error part-way leaves the file as it was. OutboxFull still commits the evictions it counted."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except OutboxFull:
            self.db.execute("COMMIT")
            raise
        except BaseException:
            self.db.execute("ROLLBACK")
            self._count, self._bytes = (int(x) for x in self.db.execute(
                "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox").fetchone())
            raise
        else:
            self.db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass
            self.db.close()

    # ---- policy (called with the lock held)

    def _make_room(self, need: int) -> bool:
        """Evict droppable items per the policy until ``need`` fits; False if it cannot."""
        if self._bytes + need <= self.max_bytes:
            return True
        target = self.max_bytes - need - int(self.max_bytes * HEADROOM)   # free a little more than needed
        for kind in self.policy.thin:
            while self._bytes > target:
                rows = self.db.execute("SELECT id, size FROM outbox WHERE kind=? ORDER BY id", (kind,)).fetchall()
                if not rows:
                    break
                victims, freed = [], 0
                for i, (rid, size) in enumerate(rows):
                    if i % 2 == 0 or len(rows) == 1:   # every other sample, oldest first
                        victims.append(rid)
                        freed += size
                        if self._bytes - freed <= target:
                            break
                self._count_drop(kind, "thinned", self._delete(victims)[0])
        for kind in self.policy.oldest:
            while self._bytes > target:
                rows = self.db.execute("SELECT id, size FROM outbox WHERE kind=? ORDER BY id LIMIT 256",
                                       (kind,)).fetchall()
                if not rows:
                    break
                victims, freed = [], 0
                for rid, size in rows:
                    victims.append(rid)
                    freed += size
                    if self._bytes - freed <= target:
                        break
                self._count_drop(kind, "oldest", self._delete(victims)[0])
        return self._bytes + need <= self.max_bytes

    def _delete(self, ids: list[int]) -> tuple[int, int]:
        n = freed = 0
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            q = ",".join("?" * len(chunk))
            c, f = self.db.execute(f"SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outbox WHERE id IN ({q})",
                                   chunk).fetchone()
            self.db.execute(f"DELETE FROM outbox WHERE id IN ({q})", chunk)
            n, freed = n + int(c), freed + int(f)
        self._bytes -= freed
        self._count -= n
        return n, freed

    def _count_drop(self, kind: str, reason: str, n: int = 1) -> None:
        if n:
            per = self.dropped.setdefault(kind, {})
            per[reason] = per.get(reason, 0) + n
