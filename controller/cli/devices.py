"""Fleet reads and one-off requests: ``devices``, ``device show``, ``telemetry``, ``cmd``, ``infer``, ``feedback``.

Reads come from the registry that ``fleetctl serve`` writes (and the rollout store's desired
versions and tags); ``telemetry --follow``, ``cmd``, ``infer`` and ``feedback`` use the broker.
"""
from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import click

from protocol.lifecycle import cancel_tasks, run_until_stopped
from protocol.topics import InvalidId, validate_id

from ..config import ControllerConfig
from ..registry import Registry
from ..rollouts.store import RolloutStore
from ..table import age, compact, fmt, render
from .context import Ctx, pass_ctx
from .params import DEVICE_ID, KEY_VALUE
from .select import commands_epilog, selection_options, target_ids


def device_rows(devs: list, desired: dict[str, str] | None = None,
                certs: dict[str, float] | None = None) -> tuple[list[str], list[list[Any]]]:
    from .provision import expiry_note

    headers = ["DEVICE", "GROUP", "SITE", "ONLINE", "LAST SEEN", "MODEL", "CPU%", "MEM%", "RSS MB", "TEMP C", "CERT"]
    rows = []
    for d in devs:
        m = d.key_metrics()
        model = d.model
        want = (desired or {}).get(d.id)
        if want and model and not model.endswith("@" + want):
            model = f"{model} -> {want}"
        rows.append([d.id, d.group, getattr(d, "site", None), d.online, age(d.last_seen), model, m["cpu_percent"],
                     m["mem_used_percent"], m["rss_mb"], m["temperature_c"],
                     expiry_note((certs or {}).get(d.id))])
    return headers, rows


def _desired_versions(reg: Registry) -> dict[str, str]:
    store = RolloutStore.reader(reg.db)   # None: no rollout yet
    return {d.device_id: d.version for d in store.desired()} if store else {}


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
def devices(c: Ctx, as_json: bool) -> None:
    """List devices: id, online, last seen, model, key metrics."""
    reg = c.registry()
    devs = reg.summaries()   # columns only: no state or telemetry JSON parsed for a list
    desired = _desired_versions(reg)
    if as_json:   # one line (json's C encoder): 10,000 devices in a fraction of a second
        click.echo(json.dumps({"devices": [{**_device_summary(d), "desired_version": desired.get(d.id)}
                                           for d in devs]}))
        return
    if not devs:
        click.echo("no devices yet")
        return
    from .provision import cert_expiries

    click.echo(render(*device_rows(devs, desired, cert_expiries(reg))))


def _device_summary(d: Any) -> dict[str, Any]:
    return {"id": d.id, "group": d.group, "site": getattr(d, "site", None), "online": d.online, "last_seen": d.last_seen,
            "model": d.model, "metrics": d.key_metrics()}


@click.group()
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
        b = t.get("bytes") if isinstance(t.get("bytes"), dict) else {}
        lines += [f"cpu        {fmt(t.get('cpu_percent'))}%   load {compact(t.get('load'))}",
                  f"memory     {fmt(t.get('mem_used_percent'))}% used, agent RSS {fmt(t.get('rss_mb'))} MB",
                  f"uptime     {fmt(t.get('uptime_s'))} s (agent {fmt(t.get('agent_uptime_s'))} s)",
                  f"bytes      tx {fmt(b.get('tx_total'))}  rx {fmt(b.get('rx_total'))}"
                  f"   (tx {compact(b.get('tx'))}; rx {compact(b.get('rx'))})"]
        m = t.get("model") if isinstance(t.get("model"), dict) else None
        if m:
            lat = m.get("latency_ms") if isinstance(m.get("latency_ms"), dict) else {}
            lines.append(f"serving    {m.get('name', '-')}@{m.get('version', '-')} on {m.get('runtime', '-')}: "
                         f"{fmt(m.get('inferences'))} inferences, mean confidence {fmt(m.get('mean_confidence'))}, "
                         f"p95 {fmt(lat.get('p95_ms'))} ms, {fmt(m.get('input_errors'))} input errors")
        for k in sorted(set(t) - {"cpu_percent", "load", "mem_used_percent", "rss_mb", "uptime_s", "agent_uptime_s",
                                   "bytes", "model", "seq"}):
            lines.append(f"{k:<10} {compact(t[k]) if isinstance(t[k], (dict, list)) else fmt(t[k])}")
    if events:
        lines.append("events")
        lines += [f"  {_when(e['ts'])}  {e['level'] or ''} {e['event']}" for e in events]
    click.echo("\n".join(lines))


def _rollout_view(reg: Registry, device_id: str) -> tuple[dict[str, Any] | None, list[str]]:
    """The desired version and the tags of a device (rollout tables; absent before the first deploy)."""
    store = RolloutStore.reader(reg.db)
    if store is None:
        return None, []
    rows = store.desired(device_id)
    desired = ({"version": rows[0].version, "bundle_sha256": rows[0].bundle_sha256, "rollout_id": rows[0].rollout_id}
               if rows else None)
    return desired, store.tags(device_id).get(device_id, [])


@click.command()
@click.option("--device", "device_id", default=None, help="only this device")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@click.option("--follow", "-f", is_flag=True, help="stream live telemetry from the broker")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per line")
@pass_ctx
def telemetry(c: Ctx, device_id: str | None, limit: int, follow: bool, as_json: bool) -> None:
    """Recent telemetry from the registry, or live with --follow."""
    if follow:
        cfg = c.cfg()
        asyncio.run(run_until_stopped(lambda stop: _follow(cfg, device_id, as_json, stop)))
        return
    reg = c.registry()
    rows = reg.telemetry(device_id, limit=limit)
    for r in rows:
        _print_telemetry(r["device"], r["ts"], r["body"], as_json)


def _print_telemetry(dev: str, ts: float, body: dict[str, Any], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps({"device": dev, "ts": ts, "body": body}))
    else:
        b = body.get("bytes") if isinstance(body.get("bytes"), dict) else {}
        click.echo(f"{_when(ts)} {dev:<16} seq={body.get('seq')} cpu={fmt(body.get('cpu_percent'))}% "
                   f"mem={fmt(body.get('mem_used_percent'))}% rss={fmt(body.get('rss_mb'))}MB "
                   f"tx={fmt(b.get('tx_total'))}B")


def _when(ts: float | None) -> str:
    """UTC, to the millisecond: streamed lines from several devices line up and sort."""
    if not isinstance(ts, (int, float)):
        return "-"
    import datetime as _dt

    return _dt.datetime.fromtimestamp(ts, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


async def _follow(cfg: ControllerConfig, device_id: str | None, as_json: bool, stop: asyncio.Event) -> None:
    """Print live telemetry until ``stop`` (SIGINT/SIGTERM)."""
    from ..client import FleetClient, FleetClientError
    from protocol.envelope import DecodeError

    async def stream(fc: FleetClient) -> None:
        async for dev, env in fc.follow("telemetry"):
            if device_id and dev != device_id:
                continue
            if isinstance(env, DecodeError):
                click.echo(f"{dev}: rejected: {env}", err=True)
                continue
            _print_telemetry(dev, env.ts, dict(env.body), as_json)

    try:
        async with FleetClient(cfg) as fc:
            printer = asyncio.create_task(stream(fc), name="telemetry-follow")
            stopped = asyncio.create_task(stop.wait(), name="telemetry-stop")
            await asyncio.wait((printer, stopped), return_when=asyncio.FIRST_COMPLETED)
            await cancel_tasks((printer, stopped))
            if not printer.cancelled() and printer.exception() is not None:
                raise printer.exception()
    except FleetClientError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("cmd", epilog=commands_epilog())
@click.argument("words", nargs=-1, required=True, metavar="[DEVICE_ID] COMMAND")
@selection_options
@click.option("--arg", "args", multiple=True, type=KEY_VALUE, help="KEY=VALUE (VALUE parsed as JSON when it can be)")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@click.option("--json", "as_json", is_flag=True, help="the replies as JSON")
@pass_ctx
def cmd(c: Ctx, words: tuple[str, ...], to: tuple[str, ...], group: str | None, tag: str | None,
        all_: bool, args: tuple[tuple[str, Any], ...], timeout: float, as_json: bool) -> None:
    """Send COMMAND to DEVICE_ID (or to --to/--group/--tag/--all) and print the replies.

    e.g. `fleetctl cmd pi-07 ping`, `fleetctl cmd describe --group line-a`."""
    if len(words) > 2:
        raise click.UsageError(f"too many arguments: {' '.join(words)} (give [DEVICE_ID] COMMAND)")
    target, command = (None, words[0]) if len(words) == 1 else words
    from .select import site_selected

    site = site_selected()
    if target is None and not (to or group or tag or all_ or site):
        raise click.UsageError("give DEVICE_ID COMMAND, or COMMAND with --to/--group/--tag/--site/--all")
    if target is not None:
        if to or group or tag or all_ or site:
            raise click.UsageError("give DEVICE_ID or one of --to/--group/--tag/--all, not both")
        try:
            targets = [validate_id(target)]
        except InvalidId as exc:
            raise click.BadParameter(str(exc), param_hint="DEVICE_ID") from None
    else:
        targets = target_ids(c, to, group, tag, all_)
    replies = asyncio.run(_cmd(c.cfg(), targets, command, dict(args), timeout))
    if as_json:
        click.echo(json.dumps(replies[targets[0]] if target is not None else {"replies": replies}, indent=2))
    else:
        for dev, r in replies.items():
            if r.get("ok"):
                res = r.get("result")
                lines = ([f"  {k}: {compact(v) if isinstance(v, (dict, list)) else fmt(v)}" for k, v in res.items()]
                         if isinstance(res, dict) else [f"  {fmt(res)}"])
                click.echo(f"{dev}: {command} ok" + ("\n" + "\n".join(lines) if lines else ""))
            else:
                click.echo(f"{dev}: {command} failed: {r.get('error')}")
    if not all(r.get("ok") for r in replies.values()):
        sys.exit(1)


async def _cmd(cfg: ControllerConfig, targets: list[str], command: str, args: dict[str, Any],
               timeout: float) -> dict[str, dict]:
    from ..client import FleetClient, FleetClientError

    try:
        async with FleetClient(cfg) as fc:
            out: dict[str, dict] = {}
            for dev in targets:
                try:
                    out[dev] = await fc.command(dev, command, args, timeout)
                except FleetClientError as exc:
                    if len(targets) == 1:
                        raise
                    out[dev] = {"ok": False, "error": str(exc)}
            return out
    except FleetClientError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("infer")
@click.argument("device_id", type=DEVICE_ID)
@click.option("--input", "--x", "x_json", default=None,
              help="input as JSON: a list ('[0, 3, 16, ...]') or {name: list} for a multi-input model")
@click.option("--npy", type=click.Path(exists=True, dir_okay=False), default=None,
              help="take the input from a .npy (sent as a binary tensor)")
@click.option("--row", default=None, type=click.IntRange(0), help="row of --npy (default: the first row of a 2-D table)")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="an image file, resized and converted to the model's input (needs Pillow)")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@click.option("--json", "as_json", is_flag=True, help="the reply as JSON")
@pass_ctx
def infer_cmd(c: Ctx, device_id: str, x_json: str | None, npy: str | None, row: int | None, image: str | None,
              timeout: float, as_json: bool) -> None:
    """Ask DEVICE_ID for one inference (request/response over MQTT; tensors as a binary frame)."""
    if sum(v is not None for v in (x_json, npy, image)) != 1:
        raise click.UsageError("give exactly one of --input, --npy or --image")
    from ..tensorinput import TensorInputError, npy_tensor

    x: Any = None
    tensor = None
    if npy:
        try:
            tensor = npy_tensor(npy, row)
        except TensorInputError as exc:
            raise click.BadParameter(str(exc), param_hint="--npy") from None
    elif x_json is not None:
        try:
            x = json.loads(x_json)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--input") from None
        if not isinstance(x, (list, dict)) or not x:
            raise click.BadParameter("must be a non-empty list or an object of lists", param_hint="--input")
    reply = asyncio.run(_infer(c.cfg(), device_id, x, tensor, image, timeout))
    _print_reply(device_id, "infer", reply, as_json)


async def _infer(cfg: ControllerConfig, device_id: str, x: Any, tensor: Any, image: str | None,
                 timeout: float) -> dict:
    from ..client import FleetClient, FleetClientError
    from ..tensorinput import TensorInputError, image_tensor

    try:
        async with FleetClient(cfg) as fc:
            if image is not None:
                desc = await fc.command(device_id, "model.describe", {}, timeout)
                inputs = (desc.get("result") or {}).get("inputs")
                if not desc.get("ok") or not inputs:
                    raise click.ClickException(f"{device_id} serves no model to shape --image for: "
                                               f"{desc.get('error') or (desc.get('result') or {}).get('load_error')}")
                if len(inputs) != 1:
                    raise click.ClickException(f"the model takes {len(inputs)} inputs "
                                               f"{[i.get('name') for i in inputs]}; --image fills one")
                try:
                    tensor = image_tensor(image, inputs[0])
                except TensorInputError as exc:
                    raise click.BadParameter(str(exc), param_hint="--image") from None
            if tensor is not None:
                return await fc.infer_tensors(device_id, {"x": tensor}, timeout=timeout,
                                              compress=tensor.nbytes > 64 * 1024)
            if isinstance(x, dict):
                return await fc.infer_inputs(device_id, x, timeout=timeout)
            return await fc.infer(device_id, x, timeout=timeout)
    except FleetClientError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("feedback")
@click.argument("device_id", type=DEVICE_ID)
@click.argument("request_id")
@click.argument("label", type=int)
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(0.1, 600))
@click.option("--json", "as_json", is_flag=True, help="the reply as JSON")
@pass_ctx
def feedback_cmd(c: Ctx, device_id: str, request_id: str, label: int, timeout: float, as_json: bool) -> None:
    """Label an earlier inference REQUEST_ID on DEVICE_ID (on-device learning uses it)."""

    async def go() -> dict:
        from ..client import FleetClient, FleetClientError

        try:
            async with FleetClient(c.cfg()) as fc:
                return await fc.feedback(device_id, request_id, label, timeout)
        except FleetClientError as exc:
            raise click.ClickException(str(exc)) from None

    reply = asyncio.run(go())
    _print_reply(device_id, "feedback", reply, as_json)


def _print_reply(device_id: str, what: str, reply: dict[str, Any], as_json: bool) -> None:
    """A device's reply: JSON with --json, else its fields (``key: value``); exit 1 unless ok."""
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    elif reply.get("ok"):
        body = {k: v for k, v in reply.items() if k not in ("ok", "result")}
        res = reply.get("result")
        items = {**body, **(res if isinstance(res, dict) else {"result": res} if res is not None else {})}
        click.echo(f"{device_id}: {what} ok")
        for k, v in items.items():
            if isinstance(v, list) and len(v) > 12:
                v = [*(fmt(x) for x in v[:12]), f"… ({len(v)} values)"]
            click.echo(f"  {k}: {compact(v) if isinstance(v, (dict, list)) else fmt(v)}")
    else:
        click.echo(f"{device_id}: {what} failed: {reply.get('error')}")
    if not reply.get("ok"):
        sys.exit(1)
