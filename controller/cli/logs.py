"""``fleetctl logs DEVICE [--follow] [--since 10m] [--level warning]``: a board's own log.

The records come from the agent's ring (agent/logs): ``logs.get`` answers the history; with
``--follow`` the CLI subscribes to ``dev/{id}/reply/logs`` and renews a follow lease
(``logs.follow``) while it runs, so a board streams only while someone is reading. The board
rate-limits the stream; skipped records are reported in the stream (and stay in the ring).
"""
from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import click

from protocol.envelope import DecodeError
from protocol import envelope as env_mod
from protocol.lifecycle import cancel_tasks, run_until_stopped

from .context import Ctx, pass_ctx
from .params import DEVICE_ID, DURATION

LEASE_S = 30.0


def _line(dev: str, r: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps({"device": dev, **r})
    t = time.strftime("%H:%M:%S", time.gmtime(r["ts"])) + f".{int(r['ts'] * 1000) % 1000:03d}"
    return f"{t} {r['level'].upper():<7} {r['logger']}: {r['msg']}"


@click.command("logs")
@click.argument("device_id", type=DEVICE_ID)
@click.option("--follow", "-f", is_flag=True, help="keep streaming new records")
@click.option("--since", default=None, type=DURATION, help="only records newer than this (10m, 1h)")
@click.option("--level", default=None, type=click.Choice(["debug", "info", "warning", "error", "critical"]))
@click.option("--limit", default=500, show_default=True, type=click.IntRange(1, 1000))
@click.option("--seconds", default=0.0, type=float, help="with --follow: stop after this long (0: until Ctrl-C)")
@click.option("--json", "as_json", is_flag=True, help="one JSON object per record")
@pass_ctx
def logs(c: Ctx, device_id: str, follow: bool, since: float | None, level: str | None, limit: int,
         seconds: float, as_json: bool) -> None:
    """A board's recent log records (from its own ring), and live with --follow."""
    cfg = c.cfg()
    asyncio.run(run_until_stopped(lambda stop: _run(cfg, device_id, follow, since, level, limit, seconds,
                                                    as_json, stop)))


async def _run(cfg: Any, dev: str, follow: bool, since: float | None, level: str | None, limit: int,
               seconds: float, as_json: bool, stop: asyncio.Event) -> None:
    from ..client import FleetClient, FleetClientError

    try:
        async with FleetClient(cfg) as fc:
            stream_topic = fc.topics.reply(dev, "logs")
            if follow:   # subscribed before asking, so nothing between the history and the stream is lost
                fc.link.subscribe(stream_topic, 0)
            r = await fc.command(dev, "logs.get", {"since_s": since or 0, "level": level, "limit": limit},
                                 timeout=10)
            if not r.get("ok"):
                raise click.ClickException(f"{dev}: {r.get('error')}")
            last_seq = 0
            for rec in r["result"]["records"]:
                click.echo(_line(dev, rec, as_json))
                last_seq = rec["seq"]
            if r["result"].get("truncated"):
                click.echo(f"({dev}: older records left out; use --since/--limit)", err=True)
            if not follow:
                return
            lease = asyncio.create_task(_renew(fc, dev, level), name="logs-lease")
            printer = asyncio.create_task(_print(fc, dev, stream_topic, last_seq, as_json), name="logs-print")
            waits = [asyncio.create_task(stop.wait())]
            if seconds:
                waits.append(asyncio.create_task(asyncio.sleep(seconds)))
            await asyncio.wait([printer, lease, *waits], return_when=asyncio.FIRST_COMPLETED)
            await cancel_tasks([printer, lease, *waits])
            for t in (printer, lease):
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()
    except FleetClientError as exc:
        raise click.ClickException(str(exc)) from None


async def _renew(fc: Any, dev: str, level: str | None) -> None:
    while True:
        r = await fc.command(dev, "logs.follow", {"for_s": LEASE_S, "level": level}, timeout=10)
        if not r.get("ok"):
            raise click.ClickException(f"{dev}: {r.get('error')}")
        await asyncio.sleep(LEASE_S / 2)


async def _print(fc: Any, dev: str, topic: str, last_seq: int, as_json: bool) -> None:
    while True:
        msg = await fc.extra.get()
        if msg.topic != topic:
            continue
        try:
            env = env_mod.decode(msg.payload, expect_sender=dev)
        except DecodeError as exc:
            click.echo(f"{dev}: rejected a log message: {exc}", err=True)
            continue
        if env.body.get("dropped"):
            click.echo(f"({dev}: {env.body['dropped']} record(s) skipped by the board's rate limit; "
                       "they are still in its ring)", err=True)
        for rec in env.body.get("records", []):
            if rec.get("seq", 0) > last_seq:
                click.echo(_line(dev, rec, as_json))
                last_seq = rec["seq"]
