"""``fleetctl``: the controller service and the CLI people use.

Global options (also from the environment, click's auto_envvar_prefix):
``--broker`` / FLEETCTL_BROKER, ``--config`` / FLEETCTL_CONFIG, ``--db`` / FLEETCTL_DB.
Reads (`devices`, `device show`, `telemetry`) come from the registry that
`fleetctl serve` writes; live views (`telemetry --follow`, `cmd`) use the broker.
``--json`` output is stable and documented in docs/cli.md.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from typing import Any

import click

from ..config import ConfigError, ControllerConfig, load_config
from ..registry import Registry, RegistryError
from ..table import age, render

log = logging.getLogger("fleetctl")


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Ctx:
    def __init__(self, config: str | None, broker: str | None, db: str | None, topic_root: str | None,
                 signing_key: str | None = None) -> None:
        self.config_path, self.broker, self.db, self.topic_root = config, broker, db, topic_root
        self.signing_key = signing_key

    def cfg(self) -> ControllerConfig:
        o: dict[str, dict[str, Any]] = {}
        if self.broker:
            o.setdefault("mqtt", {})["broker"] = self.broker
        if self.topic_root:
            o.setdefault("mqtt", {})["topic_root"] = self.topic_root
        if self.db:
            o.setdefault("registry", {})["path"] = self.db
        if self.signing_key:
            o.setdefault("security", {})["signing_key"] = self.signing_key
        try:
            return load_config(self.config_path, o)
        except ConfigError as exc:
            raise click.UsageError(f"config error: {exc}") from None

    def registry(self) -> Registry:
        try:
            return Registry(self.cfg().db_path, readonly=True)
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None


pass_ctx = click.make_pass_decorator(Ctx)


@click.group(context_settings={"auto_envvar_prefix": "FLEETCTL", "help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="controller TOML config")
@click.option("--broker", default=None, help="broker URL, mqtt://host:port (overrides config)")
@click.option("--db", default=None, help="registry SQLite file (overrides config)")
@click.option("--topic-root", default=None, help="topic root (default edgefleet)")
@click.option("--signing-key", default=None, type=click.Path(dir_okay=False),
              help="Ed25519 private key that signs commands (fleetctl keys init)")
@click.version_option("0.1.0", prog_name="fleetctl")
@click.pass_context
def cli(ctx: click.Context, config: str | None, broker: str | None, db: str | None, topic_root: str | None,
        signing_key: str | None) -> None:
    """edgefleet's fleet controller and CLI."""
    ctx.obj = Ctx(config, broker, db, topic_root, signing_key)


# -- service ------------------------------------------------------------------
@cli.command()
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@pass_ctx
def serve(c: Ctx, log_level: str) -> None:
    """Run the controller service until SIGTERM/SIGINT."""
    cfg = c.cfg()
    setup_logging(log_level)
    asyncio.run(_serve(cfg))


async def _serve(cfg: ControllerConfig) -> None:
    from ..service import ControllerService

    stop = asyncio.Event()
    hits = {"n": 0}

    def on_signal(signum: int) -> None:
        hits["n"] += 1
        if hits["n"] > 1:
            os._exit(128 + signum)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    svc = ControllerService(cfg)
    log.info("registry %s, broker %s", cfg.db_path, cfg.mqtt.broker)
    try:
        await svc.run(stop)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        sys.exit(2)


# -- registry reads -----------------------------------------------------------
def device_rows(devs: list, desired: dict[str, str] | None = None) -> tuple[list[str], list[list[Any]]]:
    headers = ["DEVICE", "GROUP", "ONLINE", "LAST SEEN", "MODEL", "CPU%", "MEM%", "RSS MB", "TEMP C"]
    rows = []
    for d in devs:
        m = d.key_metrics()
        model = d.model
        want = (desired or {}).get(d.id)
        if want and model and not model.endswith("@" + want):
            model = f"{model} -> {want}"
        rows.append([d.id, d.group, d.online, age(d.last_seen), model, m["cpu_percent"],
                     m["mem_used_percent"], m["rss_mb"], m["temperature_c"]])
    return headers, rows


def _desired_versions(reg: Registry) -> dict[str, str]:
    import sqlite3

    try:
        return dict(reg.db.execute("SELECT device_id, version FROM desired").fetchall())
    except sqlite3.OperationalError:   # no rollout yet
        return {}


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
def devices(c: Ctx, as_json: bool) -> None:
    """List devices: id, online, last seen, model, key metrics."""
    reg = c.registry()
    devs = reg.devices()
    desired = _desired_versions(reg)
    if as_json:
        click.echo(json.dumps({"devices": [{**_device_summary(d), "desired_version": desired.get(d.id)}
                                           for d in devs]}, indent=2))
        return
    if not devs:
        click.echo("no devices yet")
        return
    click.echo(render(*device_rows(devs, desired)))


def _device_summary(d: Any) -> dict[str, Any]:
    return {"id": d.id, "group": d.group, "online": d.online, "last_seen": d.last_seen,
            "model": d.model, "metrics": d.key_metrics()}


@cli.group()
def device() -> None:
    """One device."""


@device.command("show")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def device_show(c: Ctx, device_id: str, as_json: bool) -> None:
    """Everything the registry knows about DEVICE_ID."""
    reg = c.registry()
    d = reg.device(device_id)
    if d is None:
        raise click.ClickException(f"unknown device {device_id!r}")
    events = reg.events(device_id, limit=10)
    desired, tags = _rollout_view(reg, device_id)
    if as_json:
        click.echo(json.dumps({**d.to_json(), "recent_events": events, "desired": desired, "tags": tags}, indent=2))
        return
    caps = (d.state or {}).get("capabilities", {})
    t = d.telemetry or {}
    lines = [f"device     {d.id}", f"group      {d.group}", f"online     {'yes' if d.online else 'no'}",
             f"last seen  {age(d.last_seen)}", f"model      {d.model or '-'}"
             + (f"   (desired {desired['version']}{', rollout ' + desired['rollout_id'] if desired['rollout_id'] else ''})"
                if desired and desired["version"] != ((d.state or {}).get("model") or {}).get("version") else ""),
             f"tags       {', '.join(tags) or '-'}",
             f"runtimes   {', '.join(caps.get('runtimes', [])) or '-'}",
             f"cores      {caps.get('cores', '-')}   memory {caps.get('memory_mb', '-')} MB   arch {caps.get('arch', '-')}"]
    if t:
        lines += [f"cpu        {t.get('cpu_percent')}%   load {t.get('load')}",
                  f"memory     {t.get('mem_used_percent')}% used, agent RSS {t.get('rss_mb')} MB",
                  f"uptime     {t.get('uptime_s')} s (agent {t.get('agent_uptime_s')} s)",
                  f"bytes      tx {t.get('bytes', {}).get('tx')}  rx {t.get('bytes', {}).get('rx')}"]
    if events:
        lines.append("events")
        lines += [f"  {age(e['ts'])}  {e['level'] or ''} {e['event']}" for e in events]
    click.echo("\n".join(lines))


def _rollout_view(reg: Registry, device_id: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The desired version and the tags of a device (rollout tables; absent before the first deploy)."""
    import sqlite3

    try:
        row = reg.db.execute("SELECT version, bundle_sha256, rollout_id FROM desired WHERE device_id=?",
                             (device_id,)).fetchone()
        tags = [r[0] for r in reg.db.execute("SELECT tag FROM device_tags WHERE device_id=? ORDER BY tag",
                                             (device_id,))]
    except sqlite3.OperationalError:
        return None, []
    desired = {"version": row[0], "bundle_sha256": row[1], "rollout_id": row[2]} if row else None
    return desired, tags


@cli.command()
@click.option("--device", "device_id", default=None, help="only this device")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--follow", "-f", is_flag=True, help="stream live telemetry from the broker")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@pass_ctx
def telemetry(c: Ctx, device_id: str | None, limit: int, follow: bool, as_json: bool) -> None:
    """Recent telemetry from the registry, or live with --follow."""
    if follow:
        try:
            asyncio.run(_follow(c.cfg(), device_id, as_json))
        except KeyboardInterrupt:
            pass
        return
    reg = c.registry()
    rows = reg.telemetry(device_id, limit=limit)
    for r in rows:
        _print_telemetry(r["device"], r["ts"], r["body"], as_json)


def _print_telemetry(dev: str, ts: float, body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"device": dev, "ts": ts, "body": body}))
    else:
        click.echo(f"{dev:<16} seq={body.get('seq')} cpu={body.get('cpu_percent')}% "
                   f"mem={body.get('mem_used_percent')}% rss={body.get('rss_mb')}MB "
                   f"tx={body.get('bytes', {}).get('tx_total')}B")


async def _follow(cfg: ControllerConfig, device_id: str | None, as_json: bool) -> None:
    from ..client import FleetClient
    from protocol.envelope import DecodeError

    async with FleetClient(cfg) as fc:
        async for dev, env in fc.follow("telemetry"):
            if device_id and dev != device_id:
                continue
            if isinstance(env, DecodeError):
                click.echo(f"{dev}: rejected: {env}", err=True)
                continue
            _print_telemetry(dev, env.ts, dict(env.body), as_json)


@cli.command("cmd")
@click.argument("device_id")
@click.argument("command")
@click.option("--arg", "args", multiple=True, help="KEY=VALUE (VALUE parsed as JSON when it can be)")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@pass_ctx
def cmd(c: Ctx, device_id: str, command: str, args: tuple[str, ...], timeout: float) -> None:
    """Send COMMAND to DEVICE_ID and print its reply (e.g. `fleetctl cmd pi-07 ping`)."""
    from protocol.topics import InvalidId, validate_id

    try:
        validate_id(device_id)
    except InvalidId as exc:
        raise click.BadParameter(str(exc), param_hint="DEVICE_ID") from None
    parsed: dict[str, Any] = {}
    for a in args:
        if "=" not in a:
            raise click.BadParameter(f"{a!r} is not KEY=VALUE", param_hint="--arg")
        k, v = a.split("=", 1)
        try:
            parsed[k] = json.loads(v)
        except ValueError:
            parsed[k] = v
    reply = asyncio.run(_cmd(c.cfg(), device_id, command, parsed, timeout))
    click.echo(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        sys.exit(1)


async def _cmd(cfg: ControllerConfig, device_id: str, command: str, args: dict[str, Any], timeout: float) -> dict:
    from ..client import FleetClient, FleetClientError

    try:
        async with FleetClient(cfg) as fc:
            return await fc.command(device_id, command, args, timeout)
    except FleetClientError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command("infer")
@click.argument("device_id")
@click.option("--x", "x_json", default=None, help="input as a JSON list, e.g. '[0, 3, 16, ...]'")
@click.option("--npy", type=click.Path(exists=True, dir_okay=False), default=None, help="take the input from a .npy")
@click.option("--row", default=0, show_default=True, type=click.IntRange(0), help="row of --npy")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@pass_ctx
def infer_cmd(c: Ctx, device_id: str, x_json: str | None, npy: str | None, row: int, timeout: float) -> None:
    """Ask DEVICE_ID for one inference (request/response over MQTT)."""
    from protocol.topics import InvalidId, validate_id

    try:
        validate_id(device_id)
    except InvalidId as exc:
        raise click.BadParameter(str(exc), param_hint="DEVICE_ID") from None
    if (x_json is None) == (npy is None):
        raise click.UsageError("give exactly one of --x or --npy")
    if npy:
        import numpy as np

        try:
            arr = np.load(npy, allow_pickle=False)
            x = arr[row].tolist()
        except (OSError, ValueError, IndexError) as exc:
            raise click.BadParameter(f"{npy}: {exc}", param_hint="--npy") from None
    else:
        try:
            x = json.loads(x_json)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--x") from None
    reply = asyncio.run(_infer(c.cfg(), device_id, x, timeout))
    click.echo(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        sys.exit(1)


async def _infer(cfg: ControllerConfig, device_id: str, x: Any, timeout: float) -> dict:
    from ..client import FleetClient, FleetClientError

    try:
        async with FleetClient(cfg) as fc:
            return await fc.infer(device_id, x, timeout=timeout)
    except FleetClientError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command("feedback")
@click.argument("device_id")
@click.argument("request_id")
@click.argument("label", type=int)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@pass_ctx
def feedback_cmd(c: Ctx, device_id: str, request_id: str, label: int, timeout: float) -> None:
    """Label an earlier inference REQUEST_ID on DEVICE_ID (on-device learning uses it)."""
    from protocol.topics import InvalidId, validate_id

    try:
        validate_id(device_id)
    except InvalidId as exc:
        raise click.BadParameter(str(exc), param_hint="DEVICE_ID") from None

    async def go() -> dict:
        from ..client import FleetClient, FleetClientError

        try:
            async with FleetClient(c.cfg()) as fc:
                return await fc.feedback(device_id, request_id, label, timeout)
        except FleetClientError as exc:
            raise click.ClickException(str(exc)) from None

    reply = asyncio.run(go())
    click.echo(json.dumps(reply, indent=2))
    if not reply.get("ok"):
        sys.exit(1)


# -- demo ---------------------------------------------------------------------
@cli.command()
@click.option("--agents", default=3, show_default=True, type=click.IntRange(1, 50), help="number of agents")
@click.option("--duration", default=None, type=click.FloatRange(1, 86400), help="stop after S seconds")
@click.option("--json", "as_json", is_flag=True, help="print a final machine-readable summary")
@click.option("--interval", default=1.0, show_default=True, type=click.FloatRange(0.2, 60), help="telemetry interval")
@click.option("--rollout-at", default=10.0, show_default=True, type=click.FloatRange(0, 86400),
              help="roll a new head version out at S seconds (canary first); 0 = no rollout")
@click.pass_context
def demo(ctx: click.Context, agents: int, duration: float | None, as_json: bool, interval: float,
         rollout_at: float) -> None:
    """Embedded broker + controller + N agents, with the fleet shown live."""
    from .demo import run_demo

    c: Ctx = ctx.obj
    sys.exit(run_demo(agents=agents, broker=c.broker, duration=duration, as_json=as_json, interval=interval,
                      topic_root=c.topic_root, rollout_at=rollout_at))


from .certs import certs  # noqa: E402 - the sub-command groups, registered explicitly
from .deploy import deploy, rollback, rollout, tag  # noqa: E402
from .keys import keys  # noqa: E402
from .model import model  # noqa: E402
from .offload import offload, offload_worker  # noqa: E402
from .patch import patch  # noqa: E402
from .report import report  # noqa: E402
from .round import round  # noqa: E402,A004

for _command in (keys, round, patch, report, offload, offload_worker, model, deploy, rollout, rollback, certs):
    cli.add_command(_command)
device.add_command(tag)


def main() -> None:
    cli(prog_name="fleetctl")

