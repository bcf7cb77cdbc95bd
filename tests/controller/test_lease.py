"""Leases (controller/lease.py): one owner at a time, take-over after expiry, epochs — pure, on
SQLite files shared by two connections as two replicas share one registry."""
from __future__ import annotations

import sqlite3

import pytest

from controller.lease import Leases


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def pair(tmp_path):
    clock = Clock()
    path = tmp_path / "reg.db"
    a = Leases(sqlite3.connect(path, timeout=5), "ctl-r1", ttl_s=6.0, clock=clock)
    b = Leases(sqlite3.connect(path, timeout=5), "ctl-r2", ttl_s=6.0, clock=clock)
    return a, b, clock


def test_one_owner_at_a_time_and_takeover_only_after_expiry(pair):
    a, b, clock = pair
    assert a.hold("fl:run-1") == 1
    assert b.hold("fl:run-1") is None
    clock.t += 5.9                     # a renews before b may take it
    assert a.hold("fl:run-1") == 1
    clock.t += 5.0
    assert b.hold("fl:run-1") is None  # renewed at +5.9: still a's
    clock.t += 6.1                     # a stopped renewing (killed): b takes it, with a new epoch
    assert b.hold("fl:run-1") == 2
    assert a.hold("fl:run-1") is None and a.lost == 1
    assert b.owner_of("fl:run-1")[0] == "ctl-r2"


def test_renewals_do_not_write_every_call_and_keep_the_epoch(pair):
    a, b, clock = pair
    assert a.hold("rollouts") == 1
    before = a.owner_of("rollouts")[1]
    clock.t += 1.0
    assert a.hold("rollouts") == 1 and a.owner_of("rollouts")[1] == before   # cached: no write
    clock.t += 2.0                                                            # past a third of the TTL
    assert a.hold("rollouts") == 1 and a.owner_of("rollouts")[1] == clock.t + 6.0


def test_cached_is_no_io_and_stops_before_expiry(pair):
    a, b, clock = pair
    assert a.cached("fl:x") is None
    a.hold("fl:x")
    assert a.cached("fl:x") == 1
    clock.t += 5.5                     # within the margin of the expiry: not acted on
    assert a.cached("fl:x") is None


def test_a_restarted_replica_retakes_its_own_lease_at_once(tmp_path):
    clock = Clock()
    path = tmp_path / "reg.db"
    a = Leases(sqlite3.connect(path), "controller", clock=clock)
    assert a.hold("fl:r") == 1
    again = Leases(sqlite3.connect(path), "controller", clock=clock)   # same name after a SIGKILL
    assert again.hold("fl:r") == 1


def test_release_lets_the_other_take_over_at_once(pair):
    a, b, clock = pair
    a.hold("fl:r")
    a.release_all()
    assert b.hold("fl:r") == 2 and a.held() == []


def test_a_busy_database_keeps_a_fresh_lease_and_drops_a_stale_one(pair, tmp_path):
    a, b, clock = pair
    a.hold("fl:r")
    lock = sqlite3.connect(tmp_path / "reg.db", timeout=0)
    lock.execute("BEGIN IMMEDIATE")     # another process holds the write lock
    a.db.execute("PRAGMA busy_timeout=10")
    clock.t += 2.5
    assert a.hold("fl:r") == 1          # not renewed, still ours until expiry
    clock.t += 3.0
    assert a.hold("fl:r") is None       # could not renew in time: not acted on
    lock.rollback()


def test_the_lease_sql_is_portable():
    import controller.lease as lease

    sql = lease.SCHEMA + lease._TAKE
    for word in ("OR REPLACE", "OR IGNORE", "rowid", "strftime", "json_extract", "AUTOINCREMENT"):
        assert word.lower() not in sql.lower()
