"""The registry on both backends (an SQLite file, a real PostgreSQL): dedupe, retention, list views,
migrations, read-only opens, body dictionaries."""
from __future__ import annotations

import json
import sqlite3

import pytest

from controller import registry as registry_mod
from controller.db import connect, migrate, parse_url, schema_version
from controller.registry import Registry, RegistryError
from protocol.envelope import Envelope


def tel(dev: str, seq: int, ts: float | None = None, **body) -> Envelope:
    kw = {"ts": ts} if ts is not None else {}
    return Envelope(kind="telemetry", sender=dev, body={"seq": seq, "cpu_percent": 10.0 + seq, **body}, **kw)


def test_duplicates_by_message_id_across_and_within_batches(registry_url):
    reg = Registry(registry_url)
    a, b = tel("pi-1", 1), tel("pi-1", 2)
    res = reg.write([("telemetry", a), ("telemetry", b), ("telemetry", a)])
    assert res.stored["telemetry"] == 2 and res.duplicates == 1
    reg.commit()
    res = reg.write([("telemetry", b), ("telemetry", tel("pi-2", 1))])
    assert res.stored["telemetry"] == 1 and res.duplicates == 1
    reg.commit()
    assert reg.telemetry_count() == 3 and reg.telemetry_count("pi-1") == 2
    ev = Envelope(kind="event", sender="pi-1", body={"event": "boot", "level": "info"})
    assert reg.record_event(ev) and not reg.record_event(ev)
    reg.commit()
    assert [e["event"] for e in reg.events("pi-1")] == ["boot"]


def test_latest_sample_and_list_columns_follow_the_newest_ts(registry_url):
    reg = Registry(registry_url)
    reg.record_state(Envelope(kind="state", sender="pi-1", body={
        "status": "online", "group": "line-3", "model": {"name": "digits", "version": "1.0", "bundle_sha256": "ab"}}))
    reg.write([("telemetry", tel("pi-1", 2, ts=200.0, rss_mb=31.5)), ("telemetry", tel("pi-1", 1, ts=100.0))])
    reg.write([("telemetry", tel("pi-1", 0, ts=50.0))])          # late and old: history only
    reg.record_state(Envelope(kind="state", sender="pi-1", body={"status": "offline"}))
    reg.commit()
    d = reg.device("pi-1")
    assert d.telemetry["seq"] == 2 and d.telemetry_ts == 200.0 and not d.online and d.model == "digits@1.0"
    [s] = reg.summaries()
    assert (s.id, s.group, s.online, s.model) == ("pi-1", "line-3", False, "digits@1.0")
    assert s.key_metrics() == {"cpu_percent": 12.0, "mem_used_percent": None, "rss_mb": 31.5, "temperature_c": None}
    assert [r["body"]["seq"] for r in reg.telemetry("pi-1", limit=10)] == [2, 1, 0]   # arrival (cursor) order
    assert reg.db.execute("SELECT bundle_sha256 FROM devices").fetchone()[0] == "ab"


def test_retention_by_count_per_device_with_bounded_prunes(registry_url):
    reg = Registry(registry_url, telemetry_keep=20, prune_every=5)
    for i in range(100):
        reg.write([("telemetry", tel("busy", i, ts=1000.0 + i))])
    for i in range(3):
        reg.write([("telemetry", tel("quiet", i, ts=1000.0 + i))])
    reg.commit()
    n = reg.telemetry_count("busy")
    assert 20 <= n <= 25, n                                        # keep, plus at most one prune interval
    assert min(r["body"]["seq"] for r in reg.telemetry("busy", limit=100)) >= 100 - n
    assert reg.telemetry_count("quiet") == 3                       # another device's rows are not touched


def test_retention_by_age(registry_url):
    reg = Registry(registry_url, telemetry_keep=1000, telemetry_max_age_s=100.0, prune_every=10)
    for i in range(10):
        reg.write([("telemetry", tel("pi-1", i, ts=1000.0 + i * 20))], now=1200.0)
    reg.commit()
    assert reg.prune_device("telemetry", "pi-1", now=1200.0) >= 0
    reg.commit()
    assert sorted(r["body"]["seq"] for r in reg.telemetry("pi-1", limit=100)) == [5, 6, 7, 8, 9]   # ts >= 1100
    # a device that went quiet is reached by the slice sweep
    reg.write([("telemetry", tel("gone", 0, ts=1000.0))], now=1000.0)
    reg.commit()
    cursor, removed = reg.prune_slice("", 100, now=5000.0)
    reg.commit()
    assert cursor == "" and removed >= 1 and reg.telemetry_count("gone") == 0


def test_prunes_walk_one_device_index_range_not_the_table(tmp_path):
    """The statements retention runs per message use the (device_id, ts) index (SQLite's plan)."""
    reg = Registry(tmp_path / "r.db")
    for sql in ("SELECT ts FROM telemetry WHERE device_id=? ORDER BY ts DESC LIMIT 1 OFFSET ?",
                "DELETE FROM telemetry WHERE device_id=? AND ts <= ?"):
        plan = " ".join(r[-1] for r in reg.db.raw.execute("EXPLAIN QUERY PLAN " + sql, ("d", 5)))
        assert "telemetry_dev_ts" in plan, plan


def test_a_registry_from_before_migrations_is_carried_over(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(registry_mod.SCHEMA_V1)
    body = {"seq": 7, "cpu_percent": 55.5, "temperature_c": 48.0}
    db.execute("INSERT INTO devices(id, online, first_seen, last_seen, state, telemetry, telemetry_ts) "
               "VALUES('old-1', 1, 1, 2, ?, ?, 2)",
               (json.dumps({"status": "online", "model": {"name": "m", "version": "3", "bundle_sha256": "cd"}}),
                json.dumps(body)))
    db.execute("INSERT INTO telemetry VALUES('m1', 'old-1', 2, 2, ?)", (json.dumps(body),))
    db.commit()
    db.close()
    reg = Registry(path)
    assert schema_version(reg.db, "registry") == len(registry_mod.MIGRATIONS)
    [s] = reg.summaries()
    assert s.model == "m@3" and s.key_metrics()["cpu_percent"] == 55.5
    assert reg.telemetry("old-1")[0]["body"] == body and reg.device("old-1").telemetry == body
    assert not reg.record_telemetry(Envelope(kind="telemetry", sender="old-1", body={}, id="m1"))  # still deduped
    reg.close()
    Registry(path).close()   # opening again applies nothing twice
    assert sqlite3.connect(path).execute(
        "SELECT COUNT(*) FROM schema_migrations WHERE component='registry'").fetchone()[0] == len(registry_mod.MIGRATIONS)


def test_migrations_are_per_component_and_applied_once(registry_url):
    db = connect(registry_url)
    steps = ["CREATE TABLE IF NOT EXISTS t_a(id TEXT PRIMARY KEY, n INTEGER, at REAL)"]
    assert migrate(db, "comp_a", steps) == 1
    db.execute("INSERT INTO t_a VALUES(?,?,?)", ("x", 2**40, 1763827200.123456))
    db.commit()
    steps.append("ALTER TABLE t_a ADD COLUMN blob BLOB")
    assert migrate(db, "comp_a", steps) == 2 and migrate(db, "comp_a", steps) == 2
    assert migrate(db, "comp_b", ["CREATE TABLE t_b(id AUTO_ID, v TEXT)"]) == 1
    db.execute("INSERT INTO t_b(v) VALUES(?)", ("one",))
    db.execute("UPDATE t_a SET blob=? WHERE id=?", (b"\x00\xff", "x"))
    db.commit()
    # REAL keeps a Unix time to the microsecond, INTEGER holds 64 bits, AUTO_ID counts, BLOB is bytes
    assert db.execute("SELECT n, at, blob FROM t_a").fetchone() == (2**40, 1763827200.123456, b"\x00\xff")
    assert db.execute("SELECT id FROM t_b").fetchone()[0] == 1
    assert (schema_version(db, "comp_a"), schema_version(db, "comp_b"), schema_version(db, "nope")) == (2, 1, 0)


def test_placeholders_and_literal_percent_signs(registry_url):
    db = connect(registry_url)
    migrate(db, "pct", ["CREATE TABLE p(k TEXT PRIMARY KEY, v TEXT)"])
    db.upsert("p", ["k"], {"k": "a%b", "v": "it's ?"})
    db.upsert("p", ["k"], {"k": "a%b", "v": "50%"})
    db.commit()
    assert db.execute("SELECT v FROM p WHERE k LIKE 'a%' AND v != '?'").fetchone()[0] == "50%"


def test_read_only_opens_refuse_writes_and_report_missing(registry_url, tmp_path):
    Registry(registry_url).close()
    ro = Registry(registry_url, readonly=True)
    with pytest.raises(ro.db.errors):
        ro.db.execute("INSERT INTO rejects(reason, count) VALUES('x', 1)")
    with pytest.raises(RegistryError, match="no registry"):
        Registry(tmp_path / "missing.db", readonly=True)


def test_unreachable_postgres_is_a_clear_error():
    with pytest.raises(RegistryError, match="cannot reach the registry at postgresql://u:\\*\\*\\*@127.0.0.1:1/x"):
        Registry("postgresql://u:secret@127.0.0.1:1/x")


def test_urls():
    assert parse_url("sqlite:////var/lib/r.db").target == "/var/lib/r.db"
    assert parse_url("sqlite:///rel/r.db").target == "rel/r.db"          # SQLAlchemy's form
    assert parse_url("/tmp/r.db").backend == "sqlite" and parse_url("postgres://h/db").backend == "postgres"
    with pytest.raises(ValueError):
        parse_url("mysql://h/db")


def test_bodies_compress_with_a_dictionary_trained_on_the_fleet(registry_url):
    reg = Registry(registry_url, train_after=300)
    sample = {"cpu_percent": 1.0, "mem_used_percent": 3.1, "disk": {"path": "/", "used_percent": 23.8},
              "msgs": {"tx": {"state": 1, "telemetry": 6}, "rx": {"cmd": 6}}, "link": {"connects": 1, "mqtt": "5"},
              "outbox": {"queued": 0, "bytes": 0, "max_bytes": 16777216}, "offload": {"enabled": False}}
    for b in range(10):
        reg.write([("telemetry", tel(f"pi-{i % 40}", i, **sample)) for i in range(b * 40, b * 40 + 40)])
    reg.commit()
    assert reg.codec.dict_id != 0
    sizes = [len(r[0]) for r in reg.db.execute("SELECT body FROM telemetry ORDER BY id")]
    assert sum(sizes[-50:]) < 0.7 * sum(sizes[:50])        # dictionary frames are smaller than plain zstd
    ro = Registry(registry_url, readonly=True)              # a reader finds the dictionary in the registry
    assert [r["body"]["seq"] for r in ro.telemetry("pi-39", limit=2)] == [359, 399]


def test_a_sample_is_stored_as_received_and_read_back_as_its_body(registry_url):
    from protocol.envelope import encode

    reg = Registry(registry_url)
    e = tel("pi-1", 5, temperature_c=51.5, note="ünïcode")
    assert reg.write([("telemetry", e, encode(e))]).stored["telemetry"] == 1
    assert reg.write([("telemetry", e, encode(e))]).duplicates == 1
    reg.commit()
    ro = Registry(registry_url, readonly=True)
    assert ro.telemetry("pi-1")[0]["body"] == dict(e.body) == ro.device("pi-1").telemetry
    assert ro.summaries()[0].key_metrics()["temperature_c"] == 51.5
