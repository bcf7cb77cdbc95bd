"""The on-disk outbox: what cannot be published now waits here and is sent in order later.

SQLite in WAL mode (one file under the state dir), so a crash or power cut loses nothing
that was put. Bounded in bytes, with a drop policy per kind:

* ``telemetry`` may be thinned: when the outbox is full, every other queued telemetry
  sample is dropped, oldest first (the series keeps its span at a coarser step);
* ``result`` summaries are dropped oldest first after that (they are re-derivable);
* ``event`` and ``update`` are never dropped: when only they are left and there is no room,
  ``put`` raises ``OutboxFull`` — loud, counted, and the caller keeps the item.

Every drop is counted by kind and reason. Used from the agent's event-loop thread only.
"""
from __future__ import annotations

from dataclasses import dataclass
import sqlite3
import time
from pathlib import Path
from typing import Any

KINDS = ("telemetry", "result", "event", "update", "reply")
NEVER_DROPPED = ("event", "update", "reply")


class OutboxFull(RuntimeError):
    pass


@dataclass(frozen=True)
class Item:
    id: int
    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    def __init__(self, path: str | Path, max_bytes: int = 16 << 20) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.db = sqlite3.connect(str(self.path), isolation_level=None, timeout=5)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS outbox(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
                        "topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL, retain INTEGER NOT NULL, "
                        "created REAL NOT NULL, size INTEGER NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS outbox_kind ON outbox(kind, id)")
        self.dropped: dict[str, int] = {}
        self.refused = 0
        self.put_count = 0
        self.sent_count = 0
        self._bytes = int(self.db.execute("SELECT COALESCE(SUM(size), 0) FROM outbox").fetchone()[0])

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    @property
    def nbytes(self) -> int:
        return self._bytes

    def _drop(self, kind: str, n: int, reason: str) -> None:
        key = f"{kind}:{reason}"
        self.dropped[key] = self.dropped.get(key, 0) + n

    def _make_room(self, need: int) -> None:
        if self._bytes + need <= self.max_bytes:
            return
        # 1. thin telemetry: drop every other sample, oldest first, until it fits or none is left
        while self._bytes + need > self.max_bytes:
            ids = [r[0] for r in self.db.execute("SELECT id FROM outbox WHERE kind='telemetry' ORDER BY id")]
            if not ids:
                break
            victims = ids[::2] if len(ids) > 1 else ids
            self._delete(victims, "telemetry", "thinned")
        # 2. result summaries, oldest first
        while self._bytes + need > self.max_bytes:
            row = self.db.execute("SELECT id FROM outbox WHERE kind='result' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                break
            self._delete([row[0]], "result", "oldest")
        if self._bytes + need > self.max_bytes:
            self.refused += 1
            raise OutboxFull(f"outbox full ({self._bytes} of {self.max_bytes} bytes) of events/updates; "
                             "new item refused")

    def _delete(self, ids: list[int], kind: str, reason: str) -> None:
        q = ",".join("?" * len(ids))
        freed = self.db.execute(f"SELECT COALESCE(SUM(size), 0) FROM outbox WHERE id IN ({q})", ids).fetchone()[0]
        self.db.execute(f"DELETE FROM outbox WHERE id IN ({q})", ids)
        self._bytes -= int(freed)
        self._drop(kind, len(ids), reason)

    def put(self, kind: str, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown outbox kind {kind!r}")
        size = len(payload) + len(topic) + 32
        if size > self.max_bytes:
            if kind in NEVER_DROPPED:
                self.refused += 1
                raise OutboxFull(f"{kind} of {size} bytes is larger than the whole outbox")
            self._drop(kind, 1, "too_large")
            return
        if kind == "telemetry" or kind == "result":
            try:
                self._make_room(size)
            except OutboxFull:
                self._drop(kind, 1, "full")
                return
        else:
            self._make_room(size)
        self.db.execute("INSERT INTO outbox(kind, topic, payload, qos, retain, created, size) VALUES(?,?,?,?,?,?,?)",
                        (kind, topic, payload, qos, int(retain), time.time(), size))
        self._bytes += size
        self.put_count += 1

    def peek(self, limit: int = 100) -> list[Item]:
        return [Item(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5])) for r in self.db.execute(
            "SELECT id, kind, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT ?", (limit,))]

    def ack(self, ids: list[int]) -> None:
        if not ids:
            return
        q = ",".join("?" * len(ids))
        freed = self.db.execute(f"SELECT COALESCE(SUM(size), 0) FROM outbox WHERE id IN ({q})", ids).fetchone()[0]
        self.db.execute(f"DELETE FROM outbox WHERE id IN ({q})", ids)
        self._bytes -= int(freed)
        self.sent_count += len(ids)

    def stats(self) -> dict[str, Any]:
        by_kind = dict(self.db.execute("SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())
        return {"queued": sum(by_kind.values()), "queued_by_kind": by_kind, "bytes": self._bytes,
                "max_bytes": self.max_bytes, "put": self.put_count, "sent": self.sent_count,
                "dropped": dict(self.dropped), "refused": self.refused}

    def close(self) -> None:
        self.db.close()
