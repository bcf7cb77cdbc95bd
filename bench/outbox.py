"""Outbox cost: put and peek+ack throughput against raw sqlite3 inserts in the same run.

Baseline: the cheapest way to keep the same rows on disk — plain ``INSERT`` into a WAL
SQLite table, one autocommit per row, same synchronous level, no accounting, no policy.
Figures are ratios to that baseline (and absolute rates for context), for
``synchronous=normal`` (the agent's default) and ``full`` (fsync per put), plus the cost of
putting into a full outbox (telemetry thinning on every put).

    python bench/outbox.py [--quick]

Never fails on a number; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.outbox import Outbox  # noqa: E402

PAYLOAD = b'{"seq": 123456, "cpu_percent": 12.5, "rss_mb": 48.2, "temp_c": 51.0, "infer_ms_p50": 3.1}' * 2
TOPIC = "edgefleet/v1/dev/pi-07/telemetry"


def raw_inserts(path: Path, n: int, sync: str) -> float:
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute(f"PRAGMA synchronous={sync.upper()}")
    db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT, payload BLOB)")
    t0 = time.perf_counter()
    for _ in range(n):
        db.execute("INSERT INTO t(topic, payload) VALUES(?, ?)", (TOPIC, PAYLOAD))
    dt = time.perf_counter() - t0
    db.close()
    return n / dt


def outbox_puts(path: Path, n: int, sync: str) -> tuple[float, float]:
    ob = Outbox(path, max_bytes=1 << 30, synchronous=sync)
    t0 = time.perf_counter()
    for i in range(n):
        ob.put("telemetry", TOPIC, PAYLOAD)
    put_rate = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    drained = 0
    while True:
        batch = ob.peek(50)
        if not batch:
            break
        for item in batch:            # the agent acks one item per PUBACK
            ob.ack([item.id])
        drained += len(batch)
    drain_rate = drained / (time.perf_counter() - t0)
    ob.close()
    return put_rate, drain_rate


def full_outbox_puts(path: Path, n: int) -> float:
    per = len(PAYLOAD) + len(TOPIC) + 32
    ob = Outbox(path, max_bytes=per * 2000)
    for _ in range(2000):
        ob.put("telemetry", TOPIC, PAYLOAD)
    t0 = time.perf_counter()
    for _ in range(n):
        ob.put("telemetry", TOPIC, PAYLOAD)
    rate = n / (time.perf_counter() - t0)
    ob.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rows (well under 60 s)")
    args = ap.parse_args()
    n_normal = 3000 if args.quick else 20000
    n_full = 300 if args.quick else 2000
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for sync, n in (("normal", n_normal), ("full", n_full)):
            raw = raw_inserts(d / f"raw-{sync}.db", n, sync)
            put, drain = outbox_puts(d / f"ob-{sync}.db", n, sync)
            out[f"raw_insert_per_s_{sync}"] = round(raw)
            out[f"put_per_s_{sync}"] = round(put)
            out[f"ack_per_s_{sync}"] = round(drain)
            out[f"put_vs_raw_{sync}"] = round(put / raw, 3)
            out[f"ack_vs_raw_{sync}"] = round(drain / raw, 3)
            print(f"synchronous={sync:6s} raw insert {raw:9.0f}/s   outbox put {put:9.0f}/s ({put / raw:.2f}x)   "
                  f"peek+ack {drain:9.0f}/s ({drain / raw:.2f}x)")
        full = full_outbox_puts(d / "full.db", n_normal // 3)
        out["put_per_s_when_full"] = round(full)
        out["put_when_full_vs_raw"] = round(full / out["raw_insert_per_s_normal"], 3)
        print(f"full outbox (thinning telemetry): put {full:.0f}/s ({out['put_when_full_vs_raw']:.2f}x raw)")
    out["payload_bytes"] = len(PAYLOAD)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
