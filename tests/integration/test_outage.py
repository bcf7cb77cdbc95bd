"""Nothing lost when the network is not there: a real Mosquitto stopped for 15 s under a running agent."""
from __future__ import annotations

import json
import time

from tests.helpers.broker import Mosquitto
from tests.helpers.fleet import device, start_fleet, stop
from tests.helpers.waiting import wait_for

OUTAGE_S = 15.0
INTERVAL_S = 0.2   # telemetry: 75 samples produced while the broker is down


def rows(db, table: str, dev: str) -> list[tuple[str, dict]]:
    """(message id, body) of every stored telemetry sample or event of ``dev``, oldest first (read
    through the registry: telemetry bodies are stored compressed)."""
    from controller.registry import Registry

    reg = Registry(db, readonly=True)
    try:
        got = reg.telemetry(dev, limit=100_000) if table == "telemetry" else reg.events(dev, limit=100_000)
        return [(r["id"], r["body"]) for r in got]
    finally:
        reg.close()


def test_every_sample_and_event_produced_during_an_outage_arrives_exactly_once(tmp_path):
    # the production setting: the broker keeps sessions across its own restart (persistence true),
    # so the controller's queued messages survive too

    mosquitto = Mosquitto(tmp_path / "broker", persistence=True)
    mosquitto.workdir.mkdir()
    mosquitto.start()
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        add_agent("out-1", interval=INTERVAL_S)
        wait_for(lambda: (d := device(db, "out-1")) and d.online and d.telemetry, what="out-1 online")
        before = max(b["seq"] for _, b in rows(db, "telemetry", "out-1"))
        t0 = time.monotonic()
        mosquitto.stop()
        time.sleep(OUTAGE_S)
        mosquitto.start()
        outage = time.monotonic() - t0

        def caught_up():
            tel = rows(db, "telemetry", "out-1")
            seqs = {b["seq"] for _, b in tel}
            newest = max(seqs)
            if not (newest > before + OUTAGE_S / INTERVAL_S + 2 and seqs >= set(range(1, newest + 1))):
                return None
            # and the reconnect's event is in, and the newest sample was taken with the outbox drained
            ev = [b["event"] for _, b in rows(db, "events", "out-1")]
            return ev.count("connected") >= 2 and tel[-1][1]["outbox"]["queued"] == 0 and tel

        # the controller reconnects on its own backoff schedule (0.5 s doubling: ~16 s after the stop);
        # then the broker hands it everything queued in its persistent session
        tel = wait_for(caught_up, timeout=60, what="the outage's telemetry")
        seqs = [b["seq"] for _, b in tel]
        newest = max(seqs)
        produced = set(range(1, newest + 1))
        during = {s for s in produced if s > before and s <= before + int(outage / INTERVAL_S) - 2}
        assert len(during) >= 50
        assert produced <= set(seqs), f"missing samples: {sorted(produced - set(seqs))[:10]}"
        assert len(seqs) == len(set(seqs)), "a sample was stored twice"
        ev = [b["event"] for _, b in rows(db, "events", "out-1")]
        assert ev.count("link.lost") == 1 and ev.count("connected") == 2
        last = tel[-1][1]
        assert last["outbox"]["sent"] >= len(during) and not last["outbox"]["dropped"]
        assert last["link"]["disconnects"] == 1
        print(f"\noutage {outage:.1f}s: produced {len(produced)} telemetry samples ({len(during)} during the outage), "
              f"stored {len(seqs)} unique, duplicates stored 0; events {ev}; outbox {last['outbox']}")
    finally:
        for p in procs:
            stop(p)
        mosquitto.stop()
