"""``fleetctl demo``: the whole system from one command.

Starts an embedded MQTT broker on a free loopback port (or uses ``--broker``), the
controller service in this process, and N real ``edge-agent`` processes, then shows
the fleet live from the registry until ``--duration`` or Ctrl-C. With a model, it also
rolls a new head version out (``--rollout-at``): a signed head-only patch, canary first,
health-gated on every agent — the MODEL column moves from 1.0.0 to 1.0.1.
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
from typing import TYPE_CHECKING, Any

import click

from protocol.lifecycle import run_until_stopped

from ..config import parse_config
from ..table import render
from .params import BROKER_URL

if TYPE_CHECKING:  # pragma: no cover
    from ..service import ControllerService

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
        from ..modeltools.example import build_example
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
             out=None, rollout_at: float = 10.0) -> int:
    out = out or sys.stdout
    live = sys.stderr if as_json else out
    work = Path(tempfile.mkdtemp(prefix="edgefleet-demo-"))
    embedded = None
    if broker is None:
        from ..broker import EmbeddedBroker

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
    if embedded is None:
        reason = _unreachable(cfg)
        if reason:   # before any agent starts: a dead broker would otherwise show devices=0 for the whole run
            print(f"error: cannot use broker {broker}: {reason}", file=sys.stderr)
            shutil.rmtree(work, ignore_errors=True)
            return 1
    procs: list[subprocess.Popen] = []
    logs = []
    model_toml = ""
    bundle = example_bundle()
    if bundle is not None:
        from ..modeltools.example import write_replay

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
        demo_rollout = DemoRollout(bundle, work, rollout_at) if bundle is not None and rollout_at > 0 else None
        summary = asyncio.run(run_until_stopped(
            lambda stop: _run(stop, cfg, procs, duration, live, as_json, embedded is not None, demo_rollout)))
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


def _unreachable(cfg, timeout: float = 10.0) -> str | None:
    """None if the broker accepts a connection with the demo's settings, else why not."""
    from protocol.config_loader import ConfigError
    from protocol.mqttlink import try_connect

    from ..link import make_link

    async def go() -> str | None:
        try:
            return await try_connect(make_link(cfg, f"demo-probe-{os.getpid()}"), timeout)
        except ConfigError as exc:
            return str(exc)

    return asyncio.run(go())


class DemoRollout:
    """Once every agent serves the example model, roll out 1.0.1 (same backbone, a nudged head)."""

    def __init__(self, bundle: Path, work: Path, at: float) -> None:
        self.bundle, self.work, self.at = bundle, work, at
        self.rollout_id: str | None = None
        self.started: float | None = None
        self.finished: float | None = None
        self.error: str | None = None

    def maybe_start(self, svc: ControllerService, elapsed: float, n_agents: int) -> None:
        if self.rollout_id or self.error or elapsed < self.at:
            return
        devs = [d for d in svc.registry.devices() if d.online and ((d.state or {}).get("model") or {}).get("version")]
        if len(devs) < n_agents:
            return
        import numpy as np

        from protocol.bundle import load_head

        from ..modeltools.example import derive_bundle
        from ..rollouts.policy import RolloutPolicy, plan_waves

        try:
            rng = np.random.default_rng(1)
            head = {k: (v + rng.normal(0, 0.002, v.shape)).astype(np.float32)
                    for k, v in load_head(self.bundle / "head.npz").items()}
            new = derive_bundle(self.bundle, self.work / "digits-1.0.1", "1.0.1", head)
            store = svc.rollouts.store
            store.add_bundle(self.bundle)
            art = store.add_bundle(new)
        except Exception as exc:  # noqa: BLE001 - the demo goes on without its rollout
            self.error = str(exc)
            return
        policy = RolloutPolicy(canary=1 / n_agents if n_agents > 1 else 0.0, max_failures=0, wave_timeout_s=60)
        current = {d.id: (d.state["model"].get("bundle_sha256"), d.state["model"].get("version")) for d in devs}
        self.rollout_id = "demo-rollout"
        store.create_rollout(self.rollout_id, art.version, art.bundle_sha256, policy.to_dict(), {"demo": True},
                             plan_waves(sorted(current), policy.canary), current)
        self.started = time.monotonic()

    def line(self, svc: ControllerService) -> str:
        if self.error:
            return f"  rollout: not started ({self.error[:60]})"
        if not self.rollout_id:
            return f"  rollout of 1.0.1 at t={self.at:g}s"
        r = svc.rollouts.store.rollout(self.rollout_id)
        slots = svc.rollouts.store.slots(self.rollout_id)
        if r.status != "running" and self.finished is None:
            self.finished = time.monotonic()
        applied = sum(1 for x in slots if x.status == "applied")
        return f"  rollout 1.0.1: {r.status}, wave {r.wave + 1}/{r.waves}, {applied}/{len(slots)} applied"

    def summary(self, svc: ControllerService) -> dict[str, Any] | None:
        if not self.rollout_id:
            return {"status": "not started", "error": self.error} if self.error else None
        r = svc.rollouts.store.rollout(self.rollout_id)
        slots = svc.rollouts.store.slots(self.rollout_id)
        return {"rollout_id": r.id, "version": r.version, "status": r.status, "waves": r.waves,
                "applied": sum(1 for x in slots if x.status == "applied"), "devices": len(slots),
                "seconds": round((self.finished or time.monotonic()) - self.started, 2) if self.started else None}


STARTUP_GRACE_S = 60.0


async def _run(stop: asyncio.Event, cfg, procs, duration, live, as_json, embedded, demo_rollout=None) -> dict[str, Any]:
    from ..service import ControllerService

    svc = ControllerService(cfg)
    started = time.monotonic()
    svc_stop = asyncio.Event()
    svc_task = asyncio.create_task(svc.run(svc_stop), name="controller")
    tty = live.isatty()
    snapshot: list = []
    pings: dict[str, Any] = {}
    ping_task = asyncio.create_task(_ping_all(cfg, svc, pings), name="demo-ping")
    fleet_t0: float | None = None
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
            svc.registry.commit()
            snapshot = svc.registry.devices()
            now = time.monotonic()
            # the demo's clock (--duration, the rollout's moment) starts once every agent is online,
            # so a slow start (a loaded machine, a cold import) does not eat the run; at most
            # STARTUP_GRACE_S is spent waiting for them
            if fleet_t0 is None and (sum(1 for d in snapshot if d.online) >= len(procs)
                                     or now - started > STARTUP_GRACE_S):
                fleet_t0 = now
            elapsed = now - fleet_t0 if fleet_t0 is not None else 0.0
            extra = ""
            if demo_rollout is not None:
                demo_rollout.maybe_start(svc, elapsed, len(procs))
                extra = demo_rollout.line(svc)
            _show(snapshot, svc, elapsed, live, tty, pings, extra)
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
        "rollout": demo_rollout.summary(svc) if demo_rollout is not None else None,
    }


async def _ping_all(cfg, svc: ControllerService, pings: dict[str, Any]) -> None:
    """Signed request/response round trips to every agent, every few seconds."""
    from ..client import FleetClient, FleetClientError

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


def _show(devs, svc: ControllerService, elapsed: float, live, tty: bool, pings: dict[str, Any],
          extra: str = "") -> None:
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
            f"  rejected={svc.counts.get('rejected', 0)}" + extra)
    if tty:
        live.write("\x1b[H\x1b[2J" + head + "\n\n" + render(headers, rows) + "\n")
    else:
        live.write(head + "\n" + render(headers, rows) + "\n\n")
    live.flush()


@click.command()
@click.option("--broker", default=None, type=BROKER_URL,
              help="use this broker instead of the embedded one (same as the global --broker, which it overrides)")
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 50), help="number of agents")
@click.option("--duration", default=None, type=click.FloatRange(1, 86400), help="stop after S seconds")
@click.option("--json", "as_json", is_flag=True, help="print a final machine-readable summary")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.2, 60), help="telemetry interval")
@click.option("--rollout-at", default=10.0, show_default=True, type=click.FloatRange(0, 86400),
              help="roll a new head version out at S seconds (canary first); 0 = no rollout")
@click.pass_context
def demo(ctx: click.Context, broker: str | None, agents: int, duration: float | None, as_json: bool, interval: float,
         rollout_at: float) -> None:
    """Embedded broker + controller + N agents, with the fleet shown live."""
    c = ctx.obj
    sys.exit(run_demo(agents=agents, broker=broker or c.broker, duration=duration, as_json=as_json, interval=interval,
                      topic_root=c.topic_root, rollout_at=rollout_at))
