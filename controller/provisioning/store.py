"""Claims and device identities, in the controller's database (portable SQL).

A claim moves ``pending → accepted → issued → done`` (or ``rejected``); the engine commits each
step before it takes the next, so a controller killed between issuing a certificate and the
dynamic-security call finds the claim ``issued`` on restart and completes it (the broker calls
are idempotent). ``identities`` holds one row per device that has (had) a certificate:
``active`` or ``revoked``; a revoked device is refused renewals and new claims.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterable

from ..db import Database, as_database, connect, has_table, migrate

SCHEMA = """
CREATE TABLE IF NOT EXISTS claims(
    id AUTO_ID, device_id TEXT NOT NULL, nonce TEXT NOT NULL UNIQUE, status TEXT NOT NULL,
    hardware TEXT, tags TEXT, csr TEXT NOT NULL, received_at REAL NOT NULL, decided_at REAL,
    decided_by TEXT, reason TEXT, cert TEXT, serial TEXT, not_after REAL);
CREATE INDEX IF NOT EXISTS claims_status ON claims(status);
CREATE INDEX IF NOT EXISTS claims_device ON claims(device_id);
CREATE TABLE IF NOT EXISTS identities(
    device_id TEXT PRIMARY KEY, status TEXT NOT NULL, serial TEXT, not_after REAL, updated_at REAL NOT NULL,
    reason TEXT);
CREATE TABLE IF NOT EXISTS renew_nonces(nonce TEXT PRIMARY KEY, device_id TEXT NOT NULL, seen_at REAL NOT NULL);
"""

#: versioned migrations (controller/db.py): 1 = the tables above
MIGRATIONS = [SCHEMA]
OPEN = ("pending", "accepted", "issued")


@dataclass(frozen=True)
class Claim:
    id: int
    device_id: str
    nonce: str
    status: str
    hardware: dict[str, Any]
    tags: tuple[str, ...]
    csr: str
    received_at: float
    decided_by: str | None
    reason: str | None
    cert: str | None
    not_after: float | None


_COLS = "id, device_id, nonce, status, hardware, tags, csr, received_at, decided_by, reason, cert, not_after"


def _claim(r: tuple) -> Claim:
    return Claim(r[0], r[1], r[2], r[3], json.loads(r[4] or "{}"), tuple(json.loads(r[5] or "[]")), r[6], r[7],
                 r[8], r[9], r[10], r[11])


class ClaimStore:
    def __init__(self, db: Database, create: bool = True) -> None:
        self.db = as_database(db)
        if create:
            migrate(self.db, "provisioning", MIGRATIONS)

    @classmethod
    def open(cls, path: str) -> "ClaimStore":
        return cls(connect(path))

    @classmethod
    def reader(cls, db: Database) -> "ClaimStore | None":
        return cls(db, create=False) if has_table(db, "claims") else None

    # -- claims ------------------------------------------------------------
    def add(self, device_id: str, nonce: str, hardware: dict, tags: Iterable[str], csr: str,
            now: float | None = None) -> int | None:
        """Store a new pending claim; None if the nonce was seen before (a replay)."""
        cur = self.db.execute(
            "INSERT INTO claims(device_id, nonce, status, hardware, tags, csr, received_at) VALUES(?,?,?,?,?,?,?)"
            " ON CONFLICT(nonce) DO NOTHING",
            (device_id, nonce, "pending", json.dumps(hardware), json.dumps(list(tags)), csr, now or time.time()))
        self.db.commit()
        if cur.rowcount != 1:
            return None
        row = self.db.execute("SELECT id FROM claims WHERE nonce=?", (nonce,)).fetchone()
        return int(row[0])

    def has_nonce(self, nonce: str) -> bool:
        return self.db.execute("SELECT 1 FROM claims WHERE nonce=?", (nonce,)).fetchone() is not None

    def get(self, claim_id: int) -> Claim | None:
        r = self.db.execute(f"SELECT {_COLS} FROM claims WHERE id=?", (claim_id,)).fetchone()
        return _claim(r) if r else None

    def list(self, statuses: Iterable[str] | None = None) -> list[Claim]:
        if statuses is None:
            rows = self.db.execute(f"SELECT {_COLS} FROM claims ORDER BY id").fetchall()
        else:
            st = list(statuses)
            rows = self.db.execute(f"SELECT {_COLS} FROM claims WHERE status IN ({','.join('?' * len(st))})"
                                   " ORDER BY id", st).fetchall()
        return [_claim(r) for r in rows]

    def open_claim_for(self, device_id: str) -> Claim | None:
        r = self.db.execute(f"SELECT {_COLS} FROM claims WHERE device_id=? AND status IN ('pending','accepted',"
                            "'issued') ORDER BY id LIMIT 1", (device_id,)).fetchone()
        return _claim(r) if r else None

    def find(self, ref: str) -> Claim | None:
        """A claim by numeric id, or the open (else latest) claim of a device id."""
        if ref.isdigit():
            c = self.get(int(ref))
            if c:
                return c
        c = self.open_claim_for(ref)
        if c:
            return c
        r = self.db.execute(f"SELECT {_COLS} FROM claims WHERE device_id=? ORDER BY id DESC LIMIT 1",
                            (ref,)).fetchone()
        return _claim(r) if r else None

    def decide(self, claim_id: int, status: str, by: str, reason: str = "") -> bool:
        """pending → accepted/rejected (only from pending: a decision is made once)."""
        cur = self.db.execute("UPDATE claims SET status=?, decided_by=?, decided_at=?, reason=? "
                              "WHERE id=? AND status='pending'", (status, by, time.time(), reason, claim_id))
        self.db.commit()
        return cur.rowcount == 1

    def set_issued(self, claim_id: int, cert: str, serial: str, not_after: float) -> None:
        self.db.execute("UPDATE claims SET status='issued', cert=?, serial=?, not_after=? WHERE id=? "
                        "AND status='accepted'", (cert, serial, not_after, claim_id))
        self.db.commit()

    def set_status(self, claim_id: int, status: str, reason: str = "") -> None:
        self.db.execute("UPDATE claims SET status=?, reason=COALESCE(NULLIF(?, ''), reason) WHERE id=?",
                        (status, reason, claim_id))
        self.db.commit()

    # -- identities --------------------------------------------------------
    def identity(self, device_id: str) -> tuple[str, str | None, float | None] | None:
        r = self.db.execute("SELECT status, serial, not_after FROM identities WHERE device_id=?",
                            (device_id,)).fetchone()
        return (r[0], r[1], r[2]) if r else None

    def set_identity(self, device_id: str, status: str, serial: str | None, not_after: float | None,
                     reason: str = "") -> None:
        self.db.execute(
            "INSERT INTO identities(device_id, status, serial, not_after, updated_at, reason) VALUES(?,?,?,?,?,?) "
            "ON CONFLICT(device_id) DO UPDATE SET status=excluded.status, serial=COALESCE(excluded.serial, "
            "identities.serial), not_after=COALESCE(excluded.not_after, identities.not_after), "
            "updated_at=excluded.updated_at, reason=excluded.reason",
            (device_id, status, serial, not_after, time.time(), reason))
        self.db.commit()

    def identities(self) -> dict[str, tuple[str, float | None]]:
        return {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT device_id, status, not_after FROM identities")}

    def use_renew_nonce(self, device_id: str, nonce: str) -> bool:
        """False if this renewal nonce was seen before (a replayed renewal)."""
        cur = self.db.execute("INSERT INTO renew_nonces(nonce, device_id, seen_at) VALUES(?,?,?) "
                              "ON CONFLICT(nonce) DO NOTHING", (nonce, device_id, time.time()))
        self.db.commit()
        return cur.rowcount == 1
