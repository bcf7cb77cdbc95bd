"""``fleetctl status``: the controller's own figures, read from the registry ``fleetctl serve`` writes.

What came in per kind, what the writer committed, duplicates, rejects per reason, and anything
shed (by the one explicit policy, controller/ingest.py) — the same figures ``fleetctl serve``
publishes on ``ctl/telemetry``.
"""
from __future__ import annotations

import json
import time

import click

from ..table import age
from .context import Ctx, pass_ctx


@click.command()
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@pass_ctx
def status(c: Ctx, as_json: bool) -> None:
    """The controller: devices online, messages in, stored, duplicates, rejects, shed."""
    reg = c.registry()
    total, online = reg.db.execute("SELECT COUNT(*), COALESCE(SUM(online), 0) FROM devices").fetchone()
    rows = reg.db.execute("SELECT key, value FROM meta WHERE key LIKE 'ctl.stats.%' ORDER BY key").fetchall()
    controllers = [json.loads(v) for _, v in rows if v]
    rejects = reg.rejects()
    shed: dict[str, int] = {}
    for ctl in controllers:
        for k, v in ((ctl.get("ingest") or {}).get("shed") or {}).items():
            shed[k] = shed.get(k, 0) + int(v)
    out = {"registry": reg.backend, "devices": int(total), "online": int(online), "rejects": rejects,
           "shed": shed, "controllers": controllers}
    if as_json:
        click.echo(json.dumps(out))
        return
    lines = [f"registry     {reg.backend}", f"devices      {total} ({online} online)",
             f"rejects      {', '.join(f'{k} {v}' for k, v in rejects.items()) or 'none'}",
             f"shed         {', '.join(f'{k} {v}' for k, v in shed.items()) or 'none (nothing dropped)'}"]
    for ctl in controllers:
        ing = ctl.get("ingest") or {}
        lines += [f"controller   {ctl.get('controller')}  (figures from {age(ctl.get('ts') or time.time())}, "
                  f"up {ctl.get('uptime_s')} s)",
                  f"  messages   {', '.join(f'{k} {v}' for k, v in sorted((ctl.get('messages') or {}).items())) or '-'}",
                  f"  committed  {ing.get('committed', 0)} in {ing.get('batches', 0)} batches, "
                  f"{ing.get('duplicates', 0)} duplicates, {ing.get('pending', 0)} pending",
                  f"  write ms   p50 {ing.get('db_write_ms_p50')}  p99 {ing.get('db_write_ms_p99')}   "
                  f"lag ms p50 {ing.get('ingest_lag_ms_p50')}  p99 {ing.get('ingest_lag_ms_p99')}",
                  f"  db         {ing.get('db_reconnects', 0)} reconnects"]
    click.echo("\n".join(lines))
