"""Idle cost of edge-agent on a board: RSS and CPU over a window, against the broker's own client.

Starts a real Mosquitto on a free loopback port, one edge-agent (default config: telemetry every
10 s, Home Assistant discovery on) and, as the baseline, `mosquitto_sub` holding a subscription on
the same broker. Samples both processes with psutil for the window (60 s; 15 s with --quick).
Never fails on a number; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def sample(procs: dict[str, psutil.Process], window: float) -> dict[str, dict[str, float]]:
    for p in procs.values():
        p.cpu_percent(None)
    cpu0 = {k: sum(p.cpu_times()[:2]) for k, p in procs.items()}
    peak = {k: 0 for k in procs}
    rss = {k: [] for k in procs}
    t0 = time.monotonic()
    while time.monotonic() - t0 < window:
        for k, p in procs.items():
            r = p.memory_info().rss
            rss[k].append(r)
            peak[k] = max(peak[k], r)
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    return {k: {"cpu_percent": 100.0 * (sum(p.cpu_times()[:2]) - cpu0[k]) / elapsed,
                "rss_mb": sum(rss[k]) / len(rss[k]) / 2**20, "peak_rss_mb": peak[k] / 2**20}
            for k, p in procs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="15 s window instead of 60 s")
    ap.add_argument("--window", type=float, default=None)
    ap.add_argument("--interval", type=float, default=10.0, help="agent telemetry interval")
    a = ap.parse_args()
    window = a.window or (15.0 if a.quick else 60.0)
    mosq = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    sub_bin = shutil.which("mosquitto_sub")
    tmp = Path(tempfile.mkdtemp())
    port = free_port()
    conf = tmp / "m.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n")
    procs = [subprocess.Popen([mosq, "-c", str(conf)], stderr=subprocess.DEVNULL)]
    try:
        wait_port(port)
        cfg = tmp / "agent.toml"
        cfg.write_text(f'[device]\nid = "bench-1"\n[mqtt]\nbroker = "mqtt://127.0.0.1:{port}"\n'
                       f'[telemetry]\ninterval_s = {a.interval}\n[state]\ndir = "{tmp}"\n')
        agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg),
                                  "--log-level", "warning"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(agent)
        watched = {"agent": psutil.Process(agent.pid)}
        if sub_bin:
            sub = subprocess.Popen([sub_bin, "-p", str(port), "-t", "edgefleet/v1/dev/bench-1/cmd"],
                                   stdout=subprocess.DEVNULL)
            procs.append(sub)
            watched["mosquitto_sub"] = psutil.Process(sub.pid)
        time.sleep(3.0)  # start-up (imports, connect, discovery) is not idle
        res = sample(watched, window)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    ag, base = res["agent"], res.get("mosquitto_sub")
    print(f"window {window:.0f} s, telemetry every {a.interval:g} s")
    print(f"edge-agent     RSS {ag['rss_mb']:.1f} MB (peak {ag['peak_rss_mb']:.1f}), CPU {ag['cpu_percent']:.3f} %")
    figures = {"window_s": window, "agent_rss_mb": round(ag["rss_mb"], 2), "agent_peak_rss_mb": round(ag["peak_rss_mb"], 2),
               "agent_cpu_percent": round(ag["cpu_percent"], 4)}
    if base:
        print(f"mosquitto_sub  RSS {base['rss_mb']:.1f} MB, CPU {base['cpu_percent']:.3f} %  (baseline)")
        figures.update({"baseline_rss_mb": round(base["rss_mb"], 2),
                        "rss_ratio_vs_mosquitto_sub": round(ag["rss_mb"] / max(base["rss_mb"], 1e-9), 2),
                        "baseline_cpu_percent": round(base["cpu_percent"], 4)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
