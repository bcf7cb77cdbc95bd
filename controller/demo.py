"""``fleetctl demo``: the whole system from one command.

Starts an embedded MQTT broker on a free loopback port (or uses ``--broker``), the
controller service in this process, and N real ``edge-agent`` processes, then shows
the fleet live from the registry until ``--duration`` or Ctrl-C.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import parse_config
from .registry import Registry
from .service import ControllerService
from .table import render

AGENT_TOML = """\
[device]
id = "{id}"
group = "demo"
location = "bench-{n}"

[mqtt]
broker = "{broker}"
topic_root = "{root}"
protocol = "{protocol}"

[telemetry]
interval_s = {interval}

[state]
dir = "{state}"

[security]
trusted_keys = ["{pubkey}"]
{model}"""

MODEL_TOML = """
[model]
bundle = "{bundle}"

[inference]
source = "replay"
replay_x = "{x}"
replay_y = "{y}"
rate_hz = {rate}
results = "summary"
results_interval_s = 2.0
"""


def example_bundle(cache: Path | None = None) -> Path | None:
    """Build (once, cached) the example digits bundle; None when the model tools are not installed."""
    try:
        from .modeltools.example import build_example
    except ImportError:
        return None
    try:
        import onnxruntime  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError:
        return None
    base = cache or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgefleet"
    out = base / "example-digits-1.0.0"
    if not (out / "manifest.json").exists():
        build_example(out, "small")
    return out


def _agent_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "run", "--config", str(config), "--log-level", "warning"]


def run_demo(*, agents: int = 3, broker: str | None = None, duration: float | None = None,
             as_json: bool = False, interval: float = 1.0, topic_root: str | None = None,
             out=None) -> int:
    out = out or sys.stdout
    live = sys.stderr if as_json else out
    work = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    embedded = None
    if broker is None:
        from .broker import EmbeddedBroker

        embedded = EmbeddedBroker().start()
        broker = embedded.url
        print(f"embedded MQTT broker (amqtt, MQTT 3.1.1) on {broker}", file=live)
    root = topic_root or "edgefleet"
    protocol = "3.1.1" if embedded else "auto"  # amqtt speaks 3.1.1 only: skip the v5 probe
    from protocol.signing import generate, save_keypair

    save_keypair(generate(), work / "controller.pem", work / "controller.pub")  # commands are signed end to end
    cfg = parse_config({"mqtt": {"broker": broker, "topic_root": root, "protocol": protocol},
                        "registry": {"path": str(work / "controller.db")},
                        "security": {"signing_key": str(work / "controller.pem")}}, "demo")
    procs: list[subprocess.Popen] = []
    logs = []
    model_toml = ""
    bundle = example_bundle()
    if bundle is not None:
        from .modeltools.example import write_replay

        xs, ys = write_replay(work)
        print(f"example model: {bundle} (digits, int8 ONNX backbone + float head)", file=live)
    else:
        print("model tools not installed (pip install 'edgefleet[demo]'): agents run without a model", file=live)
    try:
        for i in range(1, agents + 1):
            if bundle is not None:
                model_toml = MODEL_TOML.format(bundle=bundle, x=xs, y=ys, rate=20)
            dev = f"demo-{i:02d}"
            path = work / f"{dev}.toml"
            path.write_text(AGENT_TOML.format(id=dev, n=i, broker=broker, root=root, interval=interval, protocol=protocol,
                                              pubkey=work / "controller.pub", model=model_toml,
                                              state=work / dev))
            log = open(work / f"{dev}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(_agent_cmd(path), stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONUNBUFFERED": "1"}))
        print(f"controller + {agents} agents started (logs in {work})", file=live)
        summary = asyncio.run(_run(cfg, procs, duration, live, as_json, embedded is not None))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
        if embedded:
            embedded.stop()
    summary["broker"] = broker
    summary["embedded_broker"] = embedded is not None
    if as_json:
        print(json.dumps(summary, indent=2), file=out)
    else:
        print(f"\ndemo finished: {summary['online_at_end']}/{agents} agents were online, "
              f"{summary['messages']['telemetry']} telemetry messages, rejects {summary['rejects'] or 'none'}",
              file=out)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["online_at_end"] == agents else 1


async def _run(cfg, procs, duration, live, as_json, embedded) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    svc = ControllerService(cfg)
    started = time.monotonic()
    svc_stop = asyncio.Event()
    svc_task = asyncio.create_task(svc.run(svc_stop), name="controller")
    tty = live.isatty()
    snapshot: list = []
    pings: dict[str, Any] = {}
    ping_task = asyncio.create_task(_ping_all(cfg, svc, pings), name="demo-ping")
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            elapsed = time.monotonic() - started
            svc.registry.commit()
            snapshot = svc.registry.devices()
            _show(snapshot, svc, elapsed, live, tty, pings)
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                print(f"{len(dead)} agent process(es) exited early (code {dead[0].returncode})", file=live)
                break
            if duration and elapsed >= duration:
                break
    finally:
        snapshot = svc.registry.devices()
        devices = [_final(d) for d in snapshot]
        online_at_end = sum(1 for d in snapshot if d.online)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        while any(p.poll() is None for p in procs) and time.monotonic() - t0 < 5:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # let the offline states land
        ping_task.cancel()
        await asyncio.gather(ping_task, return_exceptions=True)
        svc_stop.set()
        await svc_task
        after = {d.id: d.online for d in svc.registry.devices()}
    return {
        "duration_s": round(time.monotonic() - started, 2),
        "online_at_end": online_at_end,
        "devices": devices,
        "clean_shutdown": all(p.returncode == 0 for p in procs) and not any(after.values()),
        "messages": {k: svc.counts.get(k, 0) for k in ("state", "telemetry", "events", "duplicates", "rejected")},
        "rejects": svc.registry.rejects(),
        "signed_ping_ms": pings,
        "results": svc.registry.last_results(),
    }


async def _ping_all(cfg, svc: ControllerService, pings: dict[str, Any]) -> None:
    """Signed request/response round trips to every agent, every few seconds."""
    from .client import FleetClient, FleetClientError

    try:
        async with FleetClient(cfg, name="demo") as fc:
            while True:
                for dev in [d.id for d in svc.registry.devices() if d.online]:
                    t0 = time.perf_counter()
                    try:
                        reply = await fc.command(dev, "ping", timeout=1.0)
                        pings[dev] = round((time.perf_counter() - t0) * 1000, 2) if reply.get("ok") else reply.get("error")
                    except FleetClientError:
                        pings[dev] = None
                await asyncio.sleep(1.0)
    except FleetClientError:
        return


def _final(d) -> dict[str, Any]:
    return {"id": d.id, "group": d.group, "online": d.online, "last_seen": d.last_seen, "model": d.model,
            "state": d.state, "last_telemetry": d.telemetry}


def _show(devs, svc: ControllerService, elapsed: float, live, tty: bool, pings: dict[str, Any]) -> None:
    headers = ["DEVICE", "ONLINE", "MODEL", "INFER", "P99 MS", "ACCURACY", "CONF", "CPU%", "RSS MB", "TX BYTES",
               "PING MS", "LAST SEEN"]
    now = time.time()
    rows = []
    results = svc.registry.last_results()
    for d in devs:
        t = d.telemetry or {}
        m = t.get("model") or {}
        r = results.get(d.id, {})
        rows.append([d.id, d.online, d.model, m.get("inferences"), (m.get("latency_ms") or {}).get("p99_ms"),
                     f"{r['accuracy']:.1%}" if "accuracy" in r else None,
                     f"{m['mean_confidence']:.3f}" if m.get("mean_confidence") is not None else None,
                     t.get("cpu_percent"), t.get("rss_mb"), (t.get("bytes") or {}).get("tx_total"), pings.get(d.id),
                     f"{now - d.last_seen:.1f}s"])
    head = (f"edgefleet demo  t={elapsed:5.1f}s  devices={len(devs)}  telemetry={svc.counts.get('telemetry', 0)}"
            f"  rejected={svc.counts.get('rejected', 0)}")
    if tty:
        live.write("\x1b[H\x1b[2J" + head + "\n\n" + render(headers, rows) + "\n")
    else:
        live.write(head + "\n" + render(headers, rows) + "\n\n")
    live.flush()
