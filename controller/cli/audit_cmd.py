"""``fleetctl audit [--json]``: the append-only record of who changed the fleet."""
from __future__ import annotations

import json
import time

import click

from .. import audit as audit_mod
from ..table import render
from .context import Ctx, pass_ctx


@click.command("audit")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--action", default=None, help="only this action (e.g. deploy, device.accept)")
@click.option("--limit", default=200, show_default=True, type=click.IntRange(1, 100000))
@pass_ctx
def audit(c: Ctx, as_json: bool, action: str | None, limit: int) -> None:
    """Every operator action that changed the fleet: when, who (signing key / certificate), what."""
    reg = c.registry()
    log = audit_mod.reader(reg.db)
    entries = log.entries(limit, action) if log else []
    if as_json:
        click.echo(json.dumps({"entries": [e.as_json() for e in entries]}, indent=2))
        return
    if not entries:
        click.echo("no audit entries yet")
        return
    click.echo(render(["WHEN (UTC)", "WHO", "ACTION", "TARGET", "DETAIL"],
                      [[time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.ts)), e.actor, e.action, e.target,
                        json.dumps(e.detail, sort_keys=True)[:80]] for e in entries]))
