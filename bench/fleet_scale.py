"""The control plane at fleet scale: `fleetctl serve` ingesting thousands of boards vs mosquitto_sub.

One process simulates the fleet (bench/fleetsim.py: real MQTT 5 connections speaking the device
contract — retained state, last will, ~2 KB telemetry bodies shaped like a real agent's). The
baseline, in the same run, is ``mosquitto_sub`` subscribed at QoS 1 to the same telemetry stream:
what "reading the stream at broker speed" costs. The registry is pre-filled to steady state (every
device already holds ``keep`` samples, and the controller keeps that many, so each insert evicts
one), and ``fleetctl serve`` runs as a real process (or two: shared-subscription replicas).

Figures per run (top level: the headline run, 10,000 devices at the agent's default 10 s interval,
SQLite, one replica; objects ``hz1_1000``, ``postgres``, ``replicas_2`` for the others):

* ``ingested_fraction``: telemetry rows in the registry after the run / telemetry the broker
  acknowledged to the simulator (1.0: nothing acknowledged was lost).
* ``ingest_vs_sub``: messages the controller had stored within 1 s of the end of the send window /
  messages mosquitto_sub had received by then (whole MQTT messages, same stream).
* ``lag_ms_p50``/``lag_ms_p99``: registry ``received`` - envelope ``ts`` per stored sample.
* ``controller_cpu_vs_sub``: controller CPU seconds / mosquitto_sub CPU seconds, same window.
* ``cpu_us_per_msg``: controller CPU per stored message; ``rss_mb``: controller RSS at the end.
* ``devices_json_s``: ``fleetctl devices --json`` over the filled registry, timed inside the CLI
  process (interpreter start and imports excluded).
* ``replica_speedup``: the drain rate of a backlog held at the broker while the controllers are
  stopped (SIGSTOP, then SIGCONT), two replicas over one.

    python bench/fleet_scale.py [--quick] [--keep N]

Never fails on a number; the last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import psutil  # noqa: E402

import fleetsim  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OPENBLAS_NUM_THREADS": "1"}


@dataclass(frozen=True)
class Spec:
    name: str
    devices: int
    interval_s: float
    duration_s: float
    keep: int
    replicas: int = 1
    backend: str = "sqlite"
    saturation_msgs: int = 0     # >0: also measure the drain rate of a backlog this size


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Broker:
    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"
            "max_connections -1\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"log_dest file {workdir / 'mosquitto.log'}\nlog_type error\nlog_type warning\n")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_proc(self.proc)


def stop_proc(p: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# -- the registry --------------------------------------------------------------
def prefill(url: str, devices: int, keep: int, interval_s: float, template: dict[str, Any]) -> float:
    """Every device with its state and ``keep`` past samples, written through the registry's own
    batch API (so the rows are exactly what the controller stores). Returns the seconds it took."""
    from controller.registry import Registry
    from protocol.envelope import Envelope

    t0 = time.perf_counter()
    reg = Registry(url, telemetry_keep=keep)
    now = time.time()
    base = now - (keep + 10) * interval_s
    reg.write([("state", Envelope(kind="state", sender=f"sim-{i:05d}", body=fleetsim.state_online(f"sim-{i:05d}"),
                                  ts=base)) for i in range(devices)], now=base)
    reg.commit()
    batch: list[tuple[str, Any]] = []
    for k in range(keep):
        for i in range(devices):
            dev = f"sim-{i:05d}"
            ts = base + k * interval_s + i * interval_s / devices
            batch.append(("telemetry", Envelope(kind="telemetry", sender=dev, ts=ts,
                                                body=fleetsim.telemetry_body(template, k + 1, interval_s))))
            if len(batch) >= 2000:
                reg.write(batch, now=ts)
                reg.commit()
                batch = []
    if batch:
        reg.write(batch, now=ts)
        reg.commit()
    reg.close()
    return time.perf_counter() - t0


class Postgres:
    """A real PostgreSQL server for the run (tests/helpers/postgres.py: initdb/pg_ctl in a temp dir on a
    free loopback port); the pre-filled registry is a template database each run copies."""

    def __init__(self) -> None:
        from tests.helpers.postgres import PostgresServer

        self.server = PostgresServer().start()
        self.templates: set[str] = set()

    def registry(self, name: str, spec: Spec, template: dict[str, Any]) -> tuple[str, float | None]:
        import psycopg

        tpl = f"tpl_{spec.devices}x{spec.keep}"
        took = None
        if tpl not in self.templates:
            with psycopg.connect(self.server.url(), autocommit=True) as c:
                c.execute(f"CREATE DATABASE {tpl}")
            took = prefill(self.server.url(tpl), spec.devices, spec.keep, spec.interval_s, template)
            self.templates.add(tpl)
        db = f"run_{name}_{int(time.time() * 1000) % 10 ** 9}"
        with psycopg.connect(self.server.url(), autocommit=True) as c:
            c.execute(f"CREATE DATABASE {db} TEMPLATE {tpl}")
        return self.server.url(db), took

    def stop(self) -> None:
        self.server.stop()
        self.server.cleanup()


PG: Postgres | None = None


def registry_for(spec: Spec, workdir: Path, cache: Path, template: dict[str, Any]) -> tuple[str, float | None]:
    """A registry at steady state for ``spec``: a copy of a cached pre-filled SQLite file, or a
    PostgreSQL database made from a pre-filled template."""
    if spec.backend == "postgres":
        assert PG is not None
        return PG.registry(spec.name, spec, template)
    cached = cache / f"reg-{spec.backend}-{spec.devices}x{spec.keep}-{schema_tag()}.db"
    took = None
    if not cached.exists():
        tmp = cached.with_suffix(".tmp")
        for p in cache.glob(tmp.name + "*"):
            p.unlink()
        took = prefill(str(tmp), spec.devices, spec.keep, spec.interval_s, template)
        con = sqlite3.connect(tmp)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        os.replace(tmp, cached)
    dst = workdir / "registry.db"
    shutil.copyfile(cached, dst)
    return str(dst), took


def schema_tag() -> str:
    """Changes when the registry's code does, so a cached pre-fill is never from another schema."""
    import hashlib

    src = (ROOT / "controller" / "registry.py").read_bytes() + (ROOT / "bench" / "data" / "agent_telemetry.json").read_bytes()
    return hashlib.sha256(src).hexdigest()[:10]


def _query(url: str, sql: str, args: tuple) -> list[tuple]:
    from controller.db import connect

    db = connect(url, readonly=True, timeout=30)
    try:
        return [tuple(r) for r in db.execute(sql, args).fetchall()]
    finally:
        db.close()


def stored(url: str, t0: float, t1: float) -> list[tuple[float, float]]:
    """(ts, received) of the telemetry stored with ts in [t0, t1]."""
    return _query(url, "SELECT ts, received FROM telemetry WHERE ts >= ? AND ts <= ?", (t0, t1))


def count_stored(url: str, t0: float) -> int:
    return _query(url, "SELECT COUNT(*) FROM telemetry WHERE ts >= ?", (t0,))[0][0]


# -- processes -----------------------------------------------------------------
def controller_config(workdir: Path, broker: Broker, db: str, keep: int, replica: int, replicas: int) -> Path:
    cfg = workdir / f"controller-{replica}.toml"
    ctl = f'[controller]\nreplica = "r{replica}"\n' if replicas > 1 else ""
    cfg.write_text(f'{ctl}[mqtt]\nbroker = "{broker.url}"\n[registry]\nurl = "{db}"\n'
                   f'artifacts_dir = "{workdir / "artifacts"}"\n'
                   f"telemetry_keep_per_device = {keep}\nevents_keep_per_device = {keep}\n")
    return cfg


PROFILE_DIR: Path | None = None   # --profile: each controller runs under cProfile, its stats written there


def start_controllers(workdir: Path, broker: Broker, db: str, spec: Spec) -> list[subprocess.Popen]:
    procs = []
    for r in range(spec.replicas):
        cfg = controller_config(workdir, broker, db, spec.keep, r + 1, spec.replicas)
        prof = ["-m", "cProfile", "-o", str(PROFILE_DIR / f"{spec.name}-{r + 1}.prof")] if PROFILE_DIR else []
        procs.append(subprocess.Popen([sys.executable, *prof, "-m", "controller.cli", "--config", str(cfg), "serve"],
                                      stdout=open(workdir / f"controller-{r + 1}.log", "wb"),
                                      stderr=subprocess.STDOUT, env=ENV, cwd=ROOT))
    for r in range(spec.replicas):
        wait_log(workdir / f"controller-{r + 1}.log", "connected to", procs[r], 60)
    time.sleep(0.5)  # SUBACKs follow the connect line
    return procs


def wait_log(log: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: exited {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        time.sleep(0.05)
    raise RuntimeError(f"{log.name}: no {text!r} within {timeout}s")


def start_sub(workdir: Path, broker: Broker) -> tuple[subprocess.Popen, Path]:
    out = workdir / "sub.txt"
    p = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-V", "5", "-q", "1",
                          "-t", "edgefleet/v1/dev/+/telemetry", "-F", "%U %p"],
                         stdout=open(out, "wb"), stderr=subprocess.DEVNULL)
    return p, out


_TS = re.compile(rb'"ts":([0-9.]+)')


def sub_lines(out: Path) -> list[tuple[float, float]]:
    """(received, ts) per message mosquitto_sub printed."""
    rows = []
    for line in out.read_bytes().splitlines():
        head, _, payload = line.partition(b" ")
        m = _TS.search(payload)
        if m:
            try:
                rows.append((float(head), float(m.group(1))))
            except ValueError:
                pass
    return rows


def cpu_s(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def devices_json_seconds(db: str) -> float | None:
    code = ("import sys,time,io,contextlib\nfrom controller.cli.app import cli\n"
            "buf=io.StringIO()\nt=time.perf_counter()\n"
            "with contextlib.redirect_stdout(buf):\n"
            f"    cli.main(['--registry', {str(db)!r}, 'devices', '--json'], standalone_mode=False)\n"
            "dt=time.perf_counter()-t\nprint(dt, len(buf.getvalue()), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    try:
        return round(float(r.stderr.split()[-2]), 3)
    except (IndexError, ValueError):
        print(f"devices --json failed: {r.stderr[-500:]}", file=sys.stderr)
        return None


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# -- one run ---------------------------------------------------------------------
def run(spec: Spec, cache: Path, template: dict[str, Any]) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"fleet-scale-{spec.name}-"))
    broker = Broker(workdir)
    procs: list[subprocess.Popen] = []
    sub = None
    try:
        db, prefill_s = registry_for(spec, workdir, cache, template)
        procs = start_controllers(workdir, broker, db, spec)
        sub, sub_out = start_sub(workdir, broker)
        ctl = [psutil.Process(p.pid) for p in procs]
        subp = psutil.Process(sub.pid)
        res = asyncio.run(_drive(spec, broker, db, ctl, subp, template))
        res["devices_json_s"] = devices_json_seconds(db)
        res["rss_mb"] = round(sum(p.memory_info().rss for p in ctl) / 2 ** 20, 1)
        for p in procs:
            stop_proc(p)
        stop_proc(sub)
        t0, t1, tend = res.pop("_window")
        rows = stored(db, t0 - 1, t1 + 1)
        subs = [s for s in sub_lines(sub_out) if t0 - 1 <= s[1] <= t1 + 1]
        acked = res["acked_telemetry"]
        lags = [(r - ts) * 1000 for ts, r in rows]
        by_end = sum(1 for _, r in rows if r <= tend + 1.0)
        sub_by_end = sum(1 for r, _ in subs if r <= tend + 1.0)
        ctl_cpu, sub_cpu, cpu_msgs = res.pop("_cpu")
        out = {
            "ingest_vs_sub": round(by_end / sub_by_end, 4) if sub_by_end else None,
            "ingested_fraction": round(len(rows) / acked, 4) if acked else None,
            "lag_ms_p50": round(pct(lags, 0.50), 1) if lags else None,
            "lag_ms_p99": round(pct(lags, 0.99), 1) if lags else None,
            "controller_cpu_vs_sub": round(ctl_cpu / sub_cpu, 2) if sub_cpu else None,
            "cpu_us_per_msg": round(ctl_cpu / cpu_msgs * 1e6, 1) if cpu_msgs else None,
            "rss_mb": res["rss_mb"],
            "devices_json_s": res["devices_json_s"],
            "devices": spec.devices, "interval_s": spec.interval_s, "duration_s": spec.duration_s,
            "keep_per_device": spec.keep, "replicas": spec.replicas, "backend": spec.backend,
            "msgs_per_s": round(acked / max(1e-9, t1 - t0), 1), "acked_telemetry": acked, "stored": len(rows),
            "sub_received": len(subs), "sub_lag_ms_p99": round(pct([(r - ts) * 1000 for r, ts in subs], 0.99), 1)
            if subs else None, "sub_cpu_s": round(sub_cpu, 2), "controller_cpu_s": round(ctl_cpu, 2),
            "connect_s": res["connect_s"], "prefill_s": None if prefill_s is None else round(prefill_s, 1),
        }
        return out
    finally:
        for p in procs:
            stop_proc(p, signal.SIGKILL)
        if sub is not None:
            stop_proc(sub, signal.SIGKILL)
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _drive(spec: Spec, broker: Broker, db: str, ctl: list[psutil.Process], subp: psutil.Process,
                 template: dict[str, Any]) -> dict[str, Any]:
    fleet = fleetsim.Fleet("127.0.0.1", broker.port, spec.devices, loop=asyncio.get_running_loop())
    connect_s = await fleet.connect()
    await fleet.wait_acked(fleet.sent, 60)
    await asyncio.sleep(1.0)
    before = fleet.acked
    c0, s0 = cpu_s(ctl), cpu_s([subp])
    t0, t1 = await fleet.telemetry(spec.interval_s, spec.duration_s, template)
    await asyncio.sleep(max(0.0, t1 + 1.0 - time.time()))
    c1, s1 = cpu_s(ctl), cpu_s([subp])
    tend = t1
    await fleet.wait_acked(fleet.sent, 60)
    acked = fleet.acked - before
    cpu_msgs = sum(1 for _ts, r in stored(db, t0 - 1, t1 + 1) if r <= tend + 1.0)
    # drain: wait until everything acknowledged is stored, or nothing moved for 20 s
    last, still = -1, time.monotonic()
    while True:
        n = count_stored(db, t0 - 1)
        if n >= acked:
            break
        if n != last:
            last, still = n, time.monotonic()
        elif time.monotonic() - still > 20:
            break
        await asyncio.sleep(0.25)
    await fleet.close()
    return {"acked_telemetry": acked, "connect_s": round(connect_s, 1), "_window": (t0, t1 + 0.5, tend),
            "_cpu": (c1 - c0, s1 - s0, cpu_msgs)}


def saturation(spec: Spec, cache: Path, template: dict[str, Any]) -> dict[str, Any]:
    """Drain rate of a backlog: the controllers are stopped (SIGSTOP) while the simulator sends
    ``saturation_msgs`` (the broker holds them), then continued; rate = backlog / time to store it."""
    workdir = Path(tempfile.mkdtemp(prefix=f"fleet-sat-{spec.name}-"))
    broker = Broker(workdir)
    procs: list[subprocess.Popen] = []
    try:
        db, _ = registry_for(spec, workdir, cache, template)
        procs = start_controllers(workdir, broker, db, spec)

        async def go() -> tuple[float, int]:
            fleet = fleetsim.Fleet("127.0.0.1", broker.port, min(spec.devices, 1000), loop=asyncio.get_running_loop())
            await fleet.connect()
            await fleet.wait_acked(fleet.sent, 60)
            await asyncio.sleep(0.5)
            t_start = time.time()
            for p in procs:
                p.send_signal(signal.SIGSTOP)
            await fleet.burst(spec.saturation_msgs, template)
            t0 = time.perf_counter()
            for p in procs:
                p.send_signal(signal.SIGCONT)
            last, still = -1, time.monotonic()
            n = 0
            while True:
                n = count_stored(db, t_start)
                if n >= spec.saturation_msgs:
                    break
                if n != last:
                    last, still = n, time.monotonic()
                elif time.monotonic() - still > 20:
                    break
                await asyncio.sleep(0.05)
            dt = time.perf_counter() - t0
            await fleet.close()
            return dt, n

        dt, n = asyncio.run(go())
        return {"backlog": spec.saturation_msgs, "drained": n, "seconds": round(dt, 2), "msgs_per_s": round(n / dt, 1)}
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT) if p.poll() is None else None
            stop_proc(p, signal.SIGKILL)
        broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def postgres_missing() -> str | None:
    """None if a PostgreSQL server can be started here, else why not."""
    try:
        import psycopg  # noqa: F401
        from tests.helpers.postgres import pg_bindir
    except ImportError as exc:
        return f"no PostgreSQL client/helpers: {exc}"
    try:
        pg_bindir()
    except BaseException as exc:  # noqa: BLE001 - pytest.fail raises outside BaseException's usual tree
        return f"no PostgreSQL server binaries: {exc}"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer devices, shorter runs (< 60 s)")
    ap.add_argument("--keep", type=int, default=None, help="samples per device in the pre-filled registry")
    ap.add_argument("--only", default=None, help="comma list of runs: headline,hz1_1000,postgres,replicas_2")
    ap.add_argument("--profile", default=None, help="run the controllers under cProfile, stats into this directory")
    args = ap.parse_args()
    if args.profile:
        global PROFILE_DIR
        PROFILE_DIR = Path(args.profile).resolve()
        PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    raise_fd_limit()
    template = fleetsim.telemetry_template()
    if args.quick:
        keep = args.keep or 20
        head = Spec("headline", 1000, 10.0, 10.0, keep, saturation_msgs=3000)
        hz1 = Spec("hz1_1000", 200, 1.0, 5.0, keep)
        pg_head = Spec("headline", 300, 10.0, 10.0, args.keep or 5, saturation_msgs=1500)
    else:
        keep = args.keep or 100
        head = Spec("headline", 10000, 10.0, 60.0, keep, saturation_msgs=30000)
        hz1 = Spec("hz1_1000", 1000, 1.0, 30.0, keep)
        pg_head = head
    # the registry must keep at least what one device sends in the window (or retention, not a loss,
    # would remove samples the bench counts): keep = max(--keep, samples per device in the window + 2)
    head, hz1, pg_head = (replace(sp, keep=max(sp.keep, int(sp.duration_s / sp.interval_s) + 2))
                          for sp in (head, hz1, pg_head))
    only = set(args.only.split(",")) if args.only else {"headline", "hz1_1000", "postgres", "replicas_2"}
    cache = Path(tempfile.gettempdir()) / "edgefleet-fleet-scale-cache"
    cache.mkdir(exist_ok=True)
    started = time.monotonic()
    result: dict[str, Any] = {}
    if "headline" in only:
        r = run(head, cache, template)
        print("headline", json.dumps(r), file=sys.stderr)
        result.update(r)
    if "hz1_1000" in only:
        result["hz1_1000"] = run(hz1, cache, template)
        print("hz1_1000", json.dumps(result["hz1_1000"]), file=sys.stderr)
    why = postgres_missing() if ({"postgres", "replicas_2"} & only) else None
    global PG
    if why is None and ({"postgres", "replicas_2"} & only):
        PG = Postgres()
    try:
        pg = replace(pg_head, name="postgres", backend="postgres")
        if "postgres" in only:
            if why:
                result["postgres"], result["postgres_reason"] = None, why
            else:
                result["postgres"] = run(pg, cache, template)
                print("postgres", json.dumps(result["postgres"]), file=sys.stderr)
        if "replicas_2" in only:
            # replicas share a production registry: PostgreSQL (SQLite when it is not here, said so)
            base = pg if not why else head
            two = replace(base, name="replicas_2", replicas=2)
            result["replicas_2"] = run(two, cache, template)
            if why:
                result["replicas_2"]["note"] = f"on SQLite (one file, two processes): {why}"
            print("replicas_2", json.dumps(result["replicas_2"]), file=sys.stderr)
            one_sat = saturation(replace(base, name="sat1"), cache, template)
            two_sat = saturation(replace(two, name="sat2"), cache, template)
            result["saturation_1"], result["saturation_2"] = one_sat, two_sat
            result["replica_speedup"] = round(two_sat["msgs_per_s"] / one_sat["msgs_per_s"], 2) \
                if one_sat["msgs_per_s"] else None
    finally:
        if PG is not None:
            PG.stop()
    result["quick"] = args.quick
    result["bench_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
