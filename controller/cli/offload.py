"""``fleetctl offload …`` and ``fleetctl offload-worker``."""
from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from protocol.lifecycle import run_until_stopped

from .params import DEVICE_ID, DeviceId
from .select import selection_options, target_ids


@click.group()
def offload() -> None:
    """Offload policy on devices, and fleet-wide offload figures."""


@offload.command("set")
@selection_options
@click.option("--device", "devices_old", multiple=True, type=DEVICE_ID, hidden=True,
              help="deprecated spelling of --to")
@click.option("--threshold", type=click.FloatRange(0, 1), default=None, help="offload below this confidence")
@click.option("--mode", type=click.Choice(["features", "raw"]), default=None)
@click.option("--deadline", "deadline_ms", type=click.FloatRange(1, 600000), default=None, help="milliseconds")
@click.option("--enable/--disable", "enabled", default=None)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@click.option("--json", "as_json", is_flag=True, help="the replies as JSON")
@click.pass_context
def set_(ctx: click.Context, to: tuple[str, ...], group: str | None, tag: str | None, all_: bool,
         devices_old: tuple[str, ...], threshold: float | None, mode: str | None, deadline_ms: float | None,
         enabled: bool | None, timeout: float, as_json: bool) -> None:
    """Push an offload policy to devices (signed commands; each device answers).

    Pick the devices with --to IDS, --group G, --tag T or --all (online ones are sent to)."""
    args: dict[str, Any] = {k: v for k, v in {"threshold": threshold, "mode": mode, "deadline_ms": deadline_ms,
                                              "enabled": enabled}.items() if v is not None}
    if not args:
        raise click.UsageError("nothing to set: give --threshold, --mode, --deadline or --enable/--disable")
    if devices_old:
        click.echo("warning: `offload set --device ID` is deprecated: use --to ID", err=True)
        to = tuple(to) + tuple(devices_old)
    c = ctx.obj
    cfg = c.cfg()
    targets = target_ids(c, to, group, tag, all_, online_only=True)

    async def go() -> dict[str, Any]:
        from ..client import FleetClient, FleetClientError

        out: dict[str, Any] = {}
        try:
            async with FleetClient(cfg) as fc:
                for dev in targets:
                    try:
                        out[dev] = await fc.command(dev, "offload.set", args, timeout)
                    except FleetClientError as exc:
                        out[dev] = {"ok": False, "error": str(exc)}
        except FleetClientError as exc:
            raise click.ClickException(str(exc)) from None
        return out

    replies = asyncio.run(go())
    if as_json:
        click.echo(json.dumps(replies, indent=2))
    else:
        from ..table import render

        rows = []
        for dev, r in replies.items():
            res = r.get("result") if isinstance(r.get("result"), dict) else {}
            rows.append([dev, "ok" if r.get("ok") else "failed", res.get("enabled"), res.get("threshold"),
                         res.get("mode"), res.get("deadline_ms"), "" if r.get("ok") else r.get("error")])
        click.echo(render(["DEVICE", "RESULT", "ON", "THRESH", "MODE", "DEADLINE MS", "ERROR"], rows))
    if not all(r.get("ok") for r in replies.values()):
        sys.exit(1)


@offload.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Fleet-wide offload figures from the devices' telemetry."""
    from ..table import fmt, render

    reg = ctx.obj.registry()
    rows, total = [], {"requests": 0, "offloaded": 0, "timeouts": 0, "bytes_sent": 0}
    per = {}
    for d in reg.devices():
        o = (d.telemetry or {}).get("offload")
        if not o:
            continue
        per[d.id] = o
        for k in total:
            total[k] += int(o.get(k) or 0)
        rows.append([d.id, o["enabled"], o["threshold"], o["mode"], o["requests"], o["offload_rate"],
                     (o.get("remote_latency_ms") or {}).get("p50_ms"), (o.get("remote_latency_ms") or {}).get("p95_ms"),
                     o["timeouts"], o.get("agreement"), o["bytes_sent"]])
    fleet = {**total, "offload_rate": round(total["offloaded"] / total["requests"], 4) if total["requests"] else None}
    if as_json:
        click.echo(json.dumps({"fleet": fleet, "devices": per}, indent=2))
        return
    click.echo(render(["DEVICE", "ON", "THRESH", "MODE", "REQUESTS", "RATE", "P50 MS", "P95 MS", "TIMEOUTS",
                       "AGREE", "BYTES"], rows) if rows else "no offload telemetry yet")
    click.echo(f"fleet: {total['requests']} requests, {total['offloaded']} offloaded (rate {fmt(fleet['offload_rate'])}), "
               f"{total['timeouts']} timeouts, {total['bytes_sent']} bytes sent")


@click.command("offload-worker")
@click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False), help="the larger model")
@click.option("--id", "worker_id", default=None, type=DeviceId("worker id"), help="worker id (default: host and pid)")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 64))
@click.option("--queue", "capacity", default=64, show_default=True, type=click.IntRange(1, 100000),
              help="bound of the deadline-ordered queue; past it requests are refused with code 'busy'")
@click.option("--steal/--no-steal", default=True, show_default=True,
              help="when idle, ask the busiest compatible peer for queued work it would finish late")
@click.option("--status-interval", "status_interval_s", default=2.0, show_default=True,
              type=click.FloatRange(0.1, 3600), help="seconds between status heartbeats (also sent on queue changes)")
@click.option("--emulate-service-ms", default=0.0, show_default=True, type=click.FloatRange(0, 60000),
              help="pad each request's service time to this (capacity tests with a small model)")
@click.option("--slowdown", default=1.0, show_default=True, type=click.FloatRange(1, 1000),
              help="multiply every service time (fault injection: a slow worker)")
@click.pass_context
def offload_worker(ctx: click.Context, bundle: str, worker_id: str | None, threads: int, capacity: int, steal: bool,
                   status_interval_s: float, emulate_service_ms: float, slowdown: float) -> None:
    """Serve offloaded requests with BUNDLE: deadline-ordered, hopeless requests refused at once.

    Workers share one subscription (old boards) and each has its own topic that boards route to
    by the worker's retained status (queue estimate, accepted inputs)."""
    import logging

    from protocol.bundle import BundleError

    from ..offload.worker import OffloadWorker, WorkerOptions

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        w = OffloadWorker(ctx.obj.cfg(), bundle, worker_id, threads,
                          WorkerOptions(capacity=capacity, steal=steal, status_interval_s=status_interval_s,
                                        emulate_service_ms=emulate_service_ms, slowdown=slowdown))
    except (BundleError, ValueError) as exc:
        raise click.ClickException(f"cannot serve {bundle}: {exc}") from None

    asyncio.run(run_until_stopped(w.run, logger=logging.getLogger("fleetctl.offload")))
