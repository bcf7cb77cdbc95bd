"""Request/response latency: ping and inference through ``FleetClient`` to a real agent, and an
offloaded inference round trip, each against a raw paho echo on the same broker in the same run.

Real parts: Mosquitto on a free loopback port (``set_tcp_nodelay true``), an ``edge-agent``
process serving the example digits bundle, a ``fleetctl offload-worker`` process for the offload
round trip (``[offload] mode = raw``, threshold 1.0: every request goes remote), and the raw
baseline: one paho client that echoes every QoS 1 request to its reply topic, one that sends
them and waits for each echo (the least a request/response over this broker can cost).
Never fails on a number; the last line is one JSON object with
``ping_p50_ms``, ``ping_p50_vs_raw``, ``infer_p50_ms``, ``infer_p50_vs_raw``, ``infer_p99_ms``,
``offload_p50_ms`` (and the raw echo's p50/p99).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from brokers import start_mosquitto  # noqa: E402 - bench/ is on sys.path when run as a script

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.disable(logging.WARNING)



def example_bundle(epochs: int) -> tuple[Path, list]:
    """The example digits bundle and 64 test rows, built once per version of the code that makes
    them (cached under the temp dir: building it under load took most of a quick run)."""
    import hashlib

    src = b"".join((ROOT / f).read_bytes() for f in ("controller/modeltools/example.py", "controller/modeltools/mlp.py",
                                                       "controller/modeltools/onnx_export.py", "protocol/bundle.py"))
    key = hashlib.sha256(src + str(epochs).encode()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / "edgefleet-latency-cache" / key
    if not (cache / "x.npy").exists():
        from controller.modeltools.example import build_example, digits_split

        tmp = Path(tempfile.mkdtemp(prefix="latency-cache-"))
        build_example(tmp / "small", "small", epochs=epochs)
        _, _, xte, _ = digits_split(0)
        np.save(tmp / "x.npy", xte[:64])
        cache.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(cache)                     # atomic: a half-built cache is never seen
        except OSError:                           # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return cache / "small", [row.tolist() for row in np.load(cache / "x.npy")]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def raw_echo(port: int, n: int, size: int) -> list[float]:
    """Round trips (ms) of a raw paho request → echo → reply, QoS 1 both ways, one at a time."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.mqttlink import set_nodelay

    def client(cid: str) -> mqtt.Client:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv5)
        c.on_socket_open = lambda cl, ud, sock: set_nodelay(sock)
        return c

    ready = threading.Semaphore(0)
    echo = client("raw-echo")
    echo.on_message = lambda c, u, m: c.publish("bench/echo/rep", m.payload, 1)
    echo.on_subscribe = lambda *a: ready.release()
    req = client("raw-req")
    got = threading.Event()
    req.on_message = lambda c, u, m: got.set()
    req.on_subscribe = lambda *a: ready.release()
    for c, t in ((echo, "bench/echo/req"), (req, "bench/echo/rep")):
        c.connect("127.0.0.1", port)
        c.loop_start()
        c.subscribe(t, 1)
    ready.acquire(timeout=10)
    ready.acquire(timeout=10)
    payload = b"\x5a" * size
    out = []
    for i in range(n + 20):
        got.clear()
        t = time.perf_counter()
        req.publish("bench/echo/req", payload, 1)
        if not got.wait(10):
            continue
        if i >= 20:                               # warm-up
            out.append((time.perf_counter() - t) * 1000)
    for c in (echo, req):
        c.loop_stop()
        c.disconnect()
    return out


def agent_proc(work: Path, dev: str, port: int, bundle: Path, extra: str = "") -> subprocess.Popen:
    cfg = work / f"{dev}.toml"
    cfg.write_text(f'[device]\nid = "{dev}"\n[mqtt]\nbroker = "mqtt://127.0.0.1:{port}"\n'
                   f'[telemetry]\ninterval_s = 60\n[state]\ndir = "{work / dev}"\n'
                   f'[model]\nbundle = "{bundle}"\n' + extra)
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(work / f"{dev}.log", "wb"))


async def through_client(port: int, n: int, x: list) -> dict[str, list[float]]:
    from controller.client import FleetClient
    from controller.config import load_config

    cfg = load_config(None, {"mqtt": {"broker": f"mqtt://127.0.0.1:{port}"}})
    out: dict[str, list[float]] = {"ping": [], "infer": [], "offload": [], "remote": []}
    async with FleetClient(cfg) as fc:
        for dev in ("lat-1", "off-1"):            # wait until both serve
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                try:
                    r = await fc.infer(dev, x[0], timeout=2)
                    if r.get("ok") and (dev != "off-1" or r["result"].get("path") == "remote"):
                        print(f"{dev} serving", file=sys.stderr)
                        break
                except Exception:  # noqa: BLE001 - not up yet
                    pass
        for kind, call in (("ping", lambda i: fc.command("lat-1", "ping", timeout=10)),
                           ("infer", lambda i: fc.infer("lat-1", x[i % len(x)], timeout=10)),
                           ("offload", lambda i: fc.infer("off-1", x[i % len(x)], timeout=10))):
            m = n if kind != "offload" else max(20, n // 3)
            for i in range(m + 20):
                t = time.perf_counter()
                r = await call(i)
                ms = (time.perf_counter() - t) * 1000
                if i >= 20 and r.get("ok") and (kind != "offload" or r["result"].get("path") == "remote"):
                    out[kind].append(ms)
                    if kind == "offload":
                        out["remote"].append(float(r["result"].get("remote_ms", "nan")))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (< 60 s)")
    a = ap.parse_args()
    n = 60 if a.quick else 1000
    t_start = time.monotonic()
    phase = lambda what: print(f"[{time.monotonic() - t_start:6.1f} s] {what}", file=sys.stderr)  # noqa: E731
    work = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    print(f"work dir {work}", file=sys.stderr)
    broker, port = start_mosquitto(work)
    procs: list[subprocess.Popen] = []
    try:
        cached, x = example_bundle(5 if a.quick else 30)
        bundle = work / "small"
        shutil.copytree(cached, bundle)           # the agents' own copy: the cache stays as built
        procs.append(agent_proc(work, "lat-1", port, bundle))
        procs.append(agent_proc(work, "off-1", port, bundle,
                                '[offload]\nenabled = true\nthreshold = 1.0\nmode = "raw"\ndeadline_ms = 5000\n'))
        procs.append(subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", f"mqtt://127.0.0.1:{port}",
                                       "offload-worker", "--bundle", str(bundle), "--id", "w1"],
                                      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(work / "worker.log", "wb")))
        phase("bundle built, agents and worker starting")
        req_size = len(json.dumps({"x": x[0]}))
        raw = raw_echo(port, n, 300)
        phase("raw echo measured")
        got = asyncio.run(through_client(port, n, x))
        phase("requests through FleetClient measured")
        raw_after = raw_echo(port, n // 2, 300)          # the machine may have changed: both ends of the run
        raw_all = raw + raw_after
        raw50, raw99 = pct(raw_all, 50), pct(raw_all, 99)
        res = {"raw_echo_p50_ms": round(raw50, 3), "raw_echo_p99_ms": round(raw99, 3),
               "ping_p50_ms": round(pct(got["ping"], 50), 3), "ping_p99_ms": round(pct(got["ping"], 99), 3),
               "ping_p50_vs_raw": round(pct(got["ping"], 50) / raw50, 2),
               "infer_p50_ms": round(pct(got["infer"], 50), 3), "infer_p99_ms": round(pct(got["infer"], 99), 3),
               "infer_p50_vs_raw": round(pct(got["infer"], 50) / raw50, 2),
               "offload_p50_ms": round(pct(got["offload"], 50), 3),
               "offload_p50_vs_raw": round(pct(got["offload"], 50) / raw50, 2),
               # the device's own view: request to the worker and its answer back (two hops)
               "offload_remote_p50_ms": round(pct(got["remote"], 50), 3),
               "requests": {k: len(v) for k, v in got.items()}, "raw_requests": len(raw_all),
               "infer_request_bytes": req_size}
        print(f"raw paho echo (QoS 1): p50 {raw50:.3f} ms p99 {raw99:.3f} ms")
        for k in ("ping", "infer", "offload"):
            print(f"{k:8s} through FleetClient: p50 {pct(got[k], 50):.3f} ms  p99 {pct(got[k], 99):.3f} ms  "
                  f"({pct(got[k], 50) / raw50:.2f}x the raw echo)")
        print(json.dumps(res))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        broker.terminate()
        broker.wait(5)


if __name__ == "__main__":
    main()
