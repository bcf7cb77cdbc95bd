"""Registry ingest cost against its own size, bytes per stored sample, and ``devices --json`` at 10,000 devices.

Embedded SQLite (the default). Baselines measured in the same run:

* ``raw``: the cheapest way to keep the same rows — a plain ``executemany`` INSERT of the same
  compressed bodies into a table with no index, no dedupe, no device row, one commit per batch;
* ``fresh``: the registry's own cost per message on an empty registry; ``full_vs_fresh`` is the
  same cost once every device holds its retained samples (1.0 = independent of size);
* ``old_window_prune_ms``: the previous retention statement (a window DELETE over the whole
  table, run every 500 messages) on the same filled table, next to ``prune_ms``, one device's prune.

    python bench/registry_ingest.py [--quick] [--devices N] [--keep K]

Never fails on a number; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.registry import Registry  # noqa: E402
from protocol.envelope import Envelope, encode  # noqa: E402


def body(seq: int, rnd: random.Random) -> dict:
    """Shaped like a real agent's telemetry (~1.2 KB of JSON: counters that move, keys that repeat)."""
    return {"seq": seq, "interval_s": 10, "cpu_percent": round(rnd.uniform(0, 100), 1),
            "load": [round(rnd.uniform(0, 4), 2) for _ in range(3)], "mem_used_percent": round(rnd.uniform(5, 90), 1),
            "mem_available_mb": rnd.randint(100, 4000), "disk": {"path": "/", "used_percent": 23.8,
                                                                  "free_mb": rnd.randint(1000, 90000)},
            "temperature_c": round(rnd.uniform(30, 80), 1), "uptime_s": 9114 + seq * 10, "agent_uptime_s": seq * 10.0,
            "rss_mb": round(rnd.uniform(30, 80), 1), "agent_cpu_percent": round(rnd.uniform(0, 5), 1),
            "msgs": {"tx": {"state": 1, "hass": 10, "events": seq // 50, "telemetry": seq, "reply": 2},
                     "rx": {"cmd": 6}, "rejected": {}},
            "bytes": {"tx": {"state": 338, "hass": 5489, "events": 161 * (seq // 50), "telemetry": 1225 * seq,
                             "reply": 569}, "rx": {"cmd": 3006}, "tx_total": 14339 + 1225 * seq, "rx_total": 3006},
            "link": {"connects": 1, "disconnects": 0, "mqtt": "5", "dropped_incoming": 0},
            "outbox": {"queued": 0, "queued_by_kind": {}, "bytes": 0, "max_bytes": 16777216, "put": 0, "sent": 0,
                       "dropped": {}, "refused": 0},
            "model": {"requests": seq * 3, "request_errors": 0},
            "offload": {"enabled": False, "threshold": 0.8, "mode": "features", "requests": 0, "offloaded": 0,
                        "offload_rate": 0.0, "remote_ok": 0, "timeouts": 0, "errors": 0, "fallbacks": 0,
                        "low_confidence_local": 0, "bytes_sent": 0, "remote_latency_ms": {"p50": None, "p95": None},
                        "rtt_ms": None, "agreement": None, "duplicate_replies": 0, "unknown_replies": 0},
            "update": {"offers": 0, "chunks": 0, "bad_chunks": 0, "stray_chunks": 0, "applied": 0, "failed": 0,
                       "resumed": 0}}


def file_bytes(path: str) -> int:
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    n = db.execute("PRAGMA page_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0]
    db.close()
    return n - free


def ingest(reg: Registry, envs: list[tuple[Envelope, bytes]], batch: int = 500) -> float:
    """CPU seconds per message through the registry's batch path (items as the service hands them to
    the writer: envelope and the payload it came in; one commit per batch, as the writer does)."""
    t0 = time.process_time()
    for i in range(0, len(envs), batch):
        reg.write([("telemetry", e, p) for e, p in envs[i:i + batch]])
        reg.commit()
    return (time.process_time() - t0) / len(envs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--keep", type=int, default=0, help="samples kept per device (default 20 quick, 60 full)")
    a = ap.parse_args()
    keep = a.keep or (20 if a.quick else 60)
    n_dev, rnd = a.devices, random.Random(7)
    work = Path(tempfile.mkdtemp(prefix="reg-bench-"))
    path = str(work / "registry.db")
    reg = Registry(path, telemetry_keep=keep, events_keep=keep, telemetry_max_age_s=0)
    for d in range(n_dev):
        reg.record_state(Envelope(kind="state", sender=f"dev-{d:05d}", body={
            "status": "online", "group": f"line-{d % 20}", "model": {"name": "digits", "version": "1.0.0",
                                                                     "bundle_sha256": "ab" * 32}}))
    reg.commit()
    ts = [1_763_000_000.0]

    def round_of(seq: int) -> list[tuple[Envelope, bytes]]:
        ts[0] += 10
        envs = [Envelope(kind="telemetry", sender=f"dev-{d:05d}", body=body(seq, rnd), ts=ts[0] + d * 1e-4)
                for d in range(n_dev)]
        return [(e, encode(e)) for e in envs]

    fresh = ingest(reg, round_of(0))
    size0, rows0 = file_bytes(path), reg.telemetry_count()
    for seq in range(1, keep + keep // 5):     # fill to the retained size, then past it (pruning runs)
        ingest(reg, round_of(seq))
    size1, rows1 = file_bytes(path), reg.telemetry_count()
    full = ingest(reg, round_of(10_000))
    per_sample = (size1 - size0) / max(1, rows1 - rows0)
    # baseline: the same compressed rows, plain INSERTs into a bare table
    raw_rows = [(e.id, e.sender, e.ts, e.ts, reg.codec.compress_envelope(p)) for e, p in round_of(20_000)]
    bare = sqlite3.connect(str(work / "raw.db"))
    bare.execute("PRAGMA journal_mode=WAL")
    bare.execute("PRAGMA synchronous=NORMAL")
    bare.execute("CREATE TABLE t(msg_id TEXT, device_id TEXT, ts REAL, received REAL, body BLOB)")
    t0 = time.process_time()
    for i in range(0, len(raw_rows), 500):
        bare.executemany("INSERT INTO t VALUES(?,?,?,?,?)", raw_rows[i:i + 500])
        bare.commit()
    raw = (time.process_time() - t0) / len(raw_rows)
    # retention: one device's prune now, against the old window DELETE over the table (rolled back)
    t0 = time.perf_counter()
    reg.prune_device("telemetry", "dev-00042")
    prune_ms = (time.perf_counter() - t0) * 1000
    reg.commit()
    old = sqlite3.connect(path)
    t0 = time.perf_counter()
    old.execute("DELETE FROM telemetry WHERE rowid IN (SELECT rowid FROM (SELECT rowid, ROW_NUMBER() OVER "
                "(PARTITION BY device_id ORDER BY ts DESC) AS rn FROM telemetry) WHERE rn > ?)", (keep,))
    old_ms = (time.perf_counter() - t0) * 1000
    old.rollback()
    old.close()
    rows = reg.telemetry_count()
    reg.close()
    # fleetctl devices --json, as a user runs it (a new process: interpreter start and imports included)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "controller.cli", "--registry", path, "devices", "--json"]
    walls, cpus = [], []
    for _ in range(3):
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, env=env, check=True).stdout
        walls.append(time.perf_counter() - t0)
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime)
    listed = len(json.loads(out)["devices"])
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import controller.cli.app"], env=env, check=True)
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    startup = c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime
    # the command alone, in this process (no interpreter start, no imports)
    from click.testing import CliRunner

    from controller.cli.app import cli
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["--registry", path, "devices", "--json"])
    inproc = time.perf_counter() - t0
    assert r.exit_code == 0, r.output
    res = {"devices": n_dev, "listed": listed, "keep_per_device": keep, "rows": rows,
           "us_per_msg_fresh": round(fresh * 1e6, 1), "us_per_msg_full": round(full * 1e6, 1),
           "full_vs_fresh": round(full / fresh, 2), "vs_raw_insert": round(full / raw, 2),
           "bytes_per_sample": round(per_sample), "disk_mb_at_1000_per_device_10k": round(per_sample * 1000 * 1e4 / 1e6),
           "prune_ms": round(prune_ms, 2), "old_window_prune_ms": round(old_ms, 1),
           "devices_json_s": round(min(walls), 3), "devices_json_cpu_s": round(min(cpus), 3),
           "devices_json_inproc_s": round(inproc, 3), "cli_import_cpu_s": round(startup, 3)}
    print(f"{n_dev} devices x {keep} samples ({rows} rows): {res['us_per_msg_fresh']} us/msg fresh, "
          f"{res['us_per_msg_full']} full ({res['full_vs_fresh']}x), {res['vs_raw_insert']}x a bare INSERT; "
          f"{res['bytes_per_sample']} B/sample; prune {res['prune_ms']} ms vs old window {res['old_window_prune_ms']} ms; "
          f"devices --json {res['devices_json_s']} s wall, {res['devices_json_cpu_s']} s CPU ({res['cli_import_cpu_s']} s of "
          f"it importing the CLI; the command alone {res['devices_json_inproc_s']} s)", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
