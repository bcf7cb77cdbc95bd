"""The registry writer against real servers: PostgreSQL restarted under load, a message the database
refuses, and acknowledgements that only ever follow a commit.

``fleetctl serve``'s service runs in-process on a real Mosquitto; the registry is a real PostgreSQL
(tests/helpers/postgres.py) or SQLite file. Nothing acknowledged may be lost, nothing stored twice.
"""
from __future__ import annotations

import asyncio
import json
import threading

import pytest
from click.testing import CliRunner

from controller.cli.app import cli
from controller.config import parse_config
from controller.ingest import IngestWriter, WriterSettings
from controller.registry import Registry
from controller.service import ControllerService
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message
from tests.helpers.waiting import Probe, until

T = "edgefleet/v1/dev"


def tel(dev: str, seq: int) -> Envelope:
    return Envelope(kind="telemetry", sender=dev, body={"seq": seq, "interval_s": 1, "cpu_percent": 1.0, "rss_mb": 20.0})


def test_postgres_restarted_under_load_loses_and_doubles_nothing(mosquitto, postgres_server, pg_url):
    cfg = parse_config({"registry": {"url": pg_url, "artifacts_dir": str(mosquitto.workdir / "artifacts"),
                                     "batch_max": 50, "flush_ms": 20},
                        "mqtt": {"broker": mosquitto.url}, "controller": {"telemetry_interval_s": 0.3}})
    envs = [tel(f"pg-{i % 10}", i) for i in range(600)]
    pub = Probe(mosquitto.port, client_id="pg-load")
    watch = Probe(mosquitto.port, ("edgefleet/v1/ctl/telemetry",), client_id="ctl-watch").wait_subscribed()

    async def main() -> ControllerService:
        svc = ControllerService(cfg)
        stop, ready = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(svc.run(stop, ready.set))
        await ready.wait()
        await until(lambda: svc.link.connected.is_set(), 30, "controller connected")

        def load() -> None:
            for e in envs:
                pub.publish(f"{T}/{e.sender}/telemetry", encode(e))
        loader = threading.Thread(target=load)
        loader.start()
        await until(lambda: svc.writer.committed >= 150, 60, "a first part stored")
        # the fault: the server crashes and comes back (same port) while messages keep coming
        await asyncio.get_running_loop().run_in_executor(None, postgres_server.restart, "immediate")
        await asyncio.get_running_loop().run_in_executor(None, loader.join)
        await until(lambda: svc.writer.stored["telemetry"] >= len(envs), 180, "every message stored")
        # the same envelopes again (an agent's outbox replayed): duplicates, not rows
        for e in envs[:40]:
            pub.publish(f"{T}/{e.sender}/telemetry", encode(e))
        await until(lambda: svc.counts["duplicates"] >= 40, 60, "the replay seen as duplicates")
        await until(lambda: svc.writer.pending == 0, 30, "nothing pending")
        await asyncio.sleep(0.7)    # two ctl telemetry intervals: the figures reach the registry
        stop.set()
        await task
        return svc

    try:
        svc = asyncio.run(main())
        # the controller's own telemetry on the broker carries the same figures
        ctl = json.loads(watch.wait(lambda t, p: json.loads(p)["body"]["ingest"].get("db_reconnects", 0) >= 1,
                                    timeout=30, what="ctl telemetry after the restart")[-1][1])
        assert ctl["kind"] == "ctl.telemetry" and ctl["body"]["ingest"]["shed"] == {}
    finally:
        pub.close()
        watch.close()
    assert svc.writer.reconnects >= 1 and not svc.writer.shed
    reg = Registry(pg_url, readonly=True)
    assert reg.telemetry_count() == len(envs)
    ids = {r[0] for r in reg.db.execute("SELECT msg_id FROM telemetry")}
    assert ids == {e.id for e in envs}
    out = CliRunner().invoke(cli, ["--registry", pg_url, "status", "--json"])
    assert out.exit_code == 0, out.output
    st = json.loads(out.output)
    assert st["registry"] == "postgres" and st["devices"] == 10 and st["shed"] == {}
    [ctl] = st["controllers"]
    assert ctl["ingest"]["db_reconnects"] >= 1 and ctl["messages"]["telemetry"] == len(envs) + 40


def _writer_run(open_registry, items, settings, check=None):
    """Feed ``items`` through an IngestWriter on a loop; returns (writer, acked messages in order)."""
    acked: list[Message] = []

    def committed(msgs, result):
        if check:
            check(msgs)
        acked.extend(msgs)

    async def main() -> IngestWriter:
        w = IngestWriter(open_registry, committed, settings)
        w.start()
        for i, it in enumerate(items):
            await w.put(Message(f"{T}/{it[1].sender}/{it[0]}", b"", 1, mid=i + 1), it)
        await w.stop()
        return w
    return asyncio.run(main()), acked


def test_acks_follow_the_commit_and_put_waits_when_the_writer_is_behind(tmp_path):
    path = str(tmp_path / "r.db")
    Registry(path).close()
    envs = [tel(f"d-{i % 7}", i) for i in range(400)]
    by_mid = {i + 1: e for i, e in enumerate(envs)}
    watcher = Registry(path, readonly=True)

    def check(msgs):   # each acknowledged message is already visible to another connection
        ids = [by_mid[m.mid].id for m in msgs]
        watcher.db.rollback()
        marks = ",".join("?" * len(ids))
        assert watcher.db.execute(f"SELECT COUNT(*) FROM telemetry WHERE msg_id IN ({marks})", ids
                                  ).fetchone()[0] == len(ids)

    w, acked = _writer_run(lambda: Registry(path), [("telemetry", e) for e in envs],
                           WriterSettings(batch_max=32, flush_s=0.01, max_pending=40), check)
    assert [m.mid for m in acked] == list(range(1, 401))            # every one, in order, once
    assert w.batches >= 400 / 32 and w.stored["telemetry"] == 400


def test_a_message_the_database_refuses_is_shed_counted_and_the_rest_stored(postgres_server, pg_url):
    """PostgreSQL text cannot hold NUL: that event can never be stored. It is shed (counted, logged,
    acknowledged) by the one explicit policy; the batch around it is stored."""
    Registry(pg_url).close()
    good = [Envelope(kind="event", sender="e-1", body={"event": f"ok-{i}", "level": "info"}) for i in range(5)]
    bad = Envelope(kind="event", sender="e-1", body={"event": "nul\x00inside", "level": "info"})
    items = [("events", e) for e in good[:2] + [bad] + good[2:]]
    w, acked = _writer_run(lambda: Registry(pg_url), items, WriterSettings(batch_max=10, flush_s=0.2))
    assert dict(w.shed) == {"store_error": 1} and len(acked) == 6
    reg = Registry(pg_url, readonly=True)
    assert sorted(e["event"] for e in reg.events("e-1")) == [f"ok-{i}" for i in range(5)]
    assert reg.rejects().get("store_error") == 1
