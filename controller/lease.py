"""Leases: each federated run and the rollout runner has exactly one owner among `fleetctl serve` replicas.

A lease is one row ``(name, owner, expires, epoch)``. A replica *holds* a lease while the row
names it and ``expires`` is in the future; it renews by writing a later ``expires`` (every third
of the TTL), and whoever finds the row expired takes it with one conditional upsert — the
database decides the race, so two replicas can never both hold it (portable SQL, the same
statement on SQLite and PostgreSQL). ``epoch`` grows on every change of owner: a runner that
sees a new epoch drops what it had cached about the item and reads the store again (the store is
the truth), so a replica that took over from a SIGKILLed one resumes at the last committed step.

A replica that was paused past its expiry (SIGSTOP, a long GC, a slow disk) checks the row
again before it acts, and finds it lost; the clocks of the replicas must agree to well within
the TTL (one host, or NTP). A clean shutdown releases its leases, so the others take over at once.

Single-process deployments use the same code: one replica takes every lease at its first tick,
and a restarted controller re-takes its own (same owner name) without waiting for the TTL.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("fleetctl.lease")

SCHEMA = """
CREATE TABLE IF NOT EXISTS leases(
    name TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL, epoch INTEGER NOT NULL);
"""

#: versioned migrations of the lease table (controller/db.py ``migrate``)
MIGRATIONS = [SCHEMA]

_TAKE = ("INSERT INTO leases(name, owner, expires, epoch) VALUES(?,?,?,1) "
         "ON CONFLICT(name) DO UPDATE SET owner=excluded.owner, expires=excluded.expires, "
         "epoch=CASE WHEN leases.owner=excluded.owner THEN leases.epoch ELSE leases.epoch+1 END "
         "WHERE leases.owner=excluded.owner OR leases.expires<?")


@dataclass(frozen=True)
class Held:
    name: str
    epoch: int
    expires: float


class Leases:
    """The leases of one replica (``owner``) over the stores' connection.

    ``db`` is a DB-API connection with ``?`` placeholders (sqlite3, or controller.db's
    backend-neutral connection). Every take/renew/release commits at once — and so commits what
    the stores wrote on the same connection before it, which is harmless (messages are still
    acknowledged only after their batch's commit). Only the runners' ticks take and renew, between
    ingest batches; message handlers read ``cached`` (no I/O)."""

    def __init__(self, db: Any, owner: str, ttl_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0:
            raise ValueError("lease ttl must be > 0")
        self.db, self.owner, self.ttl_s, self.clock = db, owner, ttl_s, clock
        #: a lease this close to its expiry is not acted on (a renewal is due long before)
        self.margin_s = min(1.0, ttl_s / 4)
        self._held: dict[str, Held] = {}
        self.acquired = 0     # times a lease came to us from nobody or another owner
        self.lost = 0
        from .db import migrate

        migrate(db, "leases", MIGRATIONS)

    def hold(self, name: str, now: float | None = None) -> int | None:
        """The lease's epoch if we hold ``name`` now (taking or renewing it as needed), else None."""
        now = self.clock() if now is None else now
        h = self._held.get(name)
        if h is not None and now < h.expires - self.ttl_s * 2 / 3:
            return h.epoch                      # renewed less than a third of a TTL ago
        expires = now + self.ttl_s
        try:
            self.db.execute(_TAKE, (name, self.owner, expires, now))
            row = self.db.execute("SELECT owner, epoch, expires FROM leases WHERE name=?", (name,)).fetchone()
            self.db.commit()
        except Exception as exc:  # noqa: BLE001 - database busy or gone: what we wrote last still holds
            try:
                self.db.rollback()
            except Exception:  # noqa: BLE001
                pass
            if h is not None and now < h.expires - self.margin_s:
                log.info("lease %s: not renewed (%s); held until %.1f", name, exc, h.expires)
                return h.epoch
            log.warning("lease %s: cannot reach the lease table (%s): acting as not the owner", name, exc)
            self._drop(name)
            return None
        if row is None or row[0] != self.owner:
            self._drop(name)
            return None
        if h is None or h.epoch != row[1]:
            self.acquired += 1
            log.info("lease %s: taken by %s (epoch %d)", name, self.owner, row[1])
        self._held[name] = Held(name, int(row[1]), float(row[2]))
        return int(row[1])

    def cached(self, name: str, now: float | None = None) -> int | None:
        """The epoch if we held ``name`` at our last renewal and it has not come near expiry — no I/O,
        for the message handlers (they run inside an ingest batch, whose commit must stay the
        batch's). Only the ticks take and renew."""
        h = self._held.get(name)
        now = self.clock() if now is None else now
        return h.epoch if h is not None and now < h.expires - self.margin_s else None

    def holds(self, name: str, now: float | None = None) -> bool:
        return self.hold(name, now) is not None

    def _drop(self, name: str) -> None:
        if self._held.pop(name, None) is not None:
            self.lost += 1
            log.warning("lease %s: no longer held by %s", name, self.owner)

    def owner_of(self, name: str) -> tuple[str, float, int] | None:
        """(owner, expires, epoch) as the table says, for status views and tests."""
        row = self.db.execute("SELECT owner, expires, epoch FROM leases WHERE name=?", (name,)).fetchone()
        self.db.commit()
        return None if row is None else (row[0], float(row[1]), int(row[2]))

    def held(self) -> list[str]:
        now = self.clock()
        return sorted(n for n, h in self._held.items() if h.expires > now)

    def release_all(self) -> None:
        """Give every lease back (clean shutdown): another replica takes over at its next tick."""
        for name in list(self._held):
            try:
                # expired now, the row (and its epoch, a fencing token) stays
                self.db.execute("UPDATE leases SET expires=0 WHERE name=? AND owner=?", (name, self.owner))
                self.db.commit()
            except Exception as exc:  # noqa: BLE001
                log.warning("lease %s: could not release (%s); it expires by itself", name, exc)
        self._held.clear()
