"""``fleetctl devices pending | accept ID… | reject ID… | revoke ID…`` — claims and identities.

These commands write the operator's decision to the controller database and wait for
``fleetctl serve`` to carry it out (issue the certificate, give the device its broker identity
through the dynamic-security plugin, answer the board; or remove it from the broker). IDs are
claim numbers or device ids. ``devices`` itself still lists devices (now with certificate
expiry); ``devices_group`` wraps the existing command so devices.py stays as it was.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import click

from .. import audit
from ..db import connect
from ..provisioning.store import ClaimStore
from ..table import age, render
from .context import Ctx, pass_ctx

WARN_EXPIRY_S = 7 * 86400


def _store(c: Ctx) -> ClaimStore:
    cfg = c.cfg()
    path = cfg.db_path
    if cfg.db_is_sqlite and not os.path.exists(path):
        raise click.ClickException(f"no controller database at {path} (is `fleetctl serve` running with this --db?)")
    return ClaimStore(connect(path))


def _resolve(store: ClaimStore, refs: tuple[str, ...], all_pending: bool) -> list[Any]:
    claims = store.list(("pending",)) if all_pending else []
    for r in refs:
        cl = store.find(r)
        if cl is None:
            raise click.BadParameter(f"no claim or device {r!r} (see fleetctl devices pending)", param_hint="ID")
        claims.append(cl)
    if not claims:
        raise click.UsageError("name at least one claim or device id (or --all)")
    return claims


def _wait(store: ClaimStore, ids: list[int], final: tuple[str, ...], timeout: float) -> dict[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        store.db.rollback()
        st = {i: (store.get(i).status if store.get(i) else "?") for i in ids}
        if all(s in final for s in st.values()) or time.monotonic() > deadline:
            return st
        time.sleep(0.1)


def expiry_note(not_after: float | None, now: float | None = None) -> str:
    """``23h``/``EXPIRED``/``-`` and a ``!`` when it is close (the warning in ``fleetctl devices``)."""
    if not not_after:
        return "-"
    left = not_after - (now or time.time())
    if left <= 0:
        return "EXPIRED!"
    text = f"{left:.0f}s" if left < 120 else f"{left / 3600:.1f}h" if left < 2 * 86400 else f"{left / 86400:.0f}d"
    return text + ("!" if left < WARN_EXPIRY_S else "")


def cert_expiries(reg: Any) -> dict[str, float]:
    """Each provisioned device's certificate expiry, as issued (renewals update it): one query, no
    telemetry parsed (the device's own view is in its telemetry, ``cert.not_after``)."""
    st = ClaimStore.reader(reg.db)
    return {d: na for d, (status, na) in st.identities().items() if na and status == "active"} if st else {}


def devices_group(devices_cmd: click.Command) -> click.Group:
    """The existing ``devices`` listing as a group that also carries the provisioning commands."""
    list_cb = devices_cmd.callback

    @click.pass_context
    def callback(ctx: click.Context, **kw: Any) -> None:
        if ctx.invoked_subcommand is None:
            ctx.invoke(list_cb, **kw)
            if not kw.get("as_json"):
                reg = ctx.obj.registry()
                soon = {d: na for d, na in cert_expiries(reg).items() if na - time.time() < WARN_EXPIRY_S}
                for d, na in sorted(soon.items()):
                    click.echo(f"warning: {d}'s certificate {'expired' if na < time.time() else 'expires in'} "
                               f"{expiry_note(na).rstrip('!')}", err=True)

    g = click.Group("devices", params=devices_cmd.params, callback=callback, invoke_without_command=True,
                    help=devices_cmd.help, commands={c.name: c for c in (pending, accept, reject, revoke)})
    return g


@click.command()
@click.option("--all", "show_all", is_flag=True, help="every claim, not only the pending ones")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def pending(c: Ctx, show_all: bool, as_json: bool) -> None:
    """Claims waiting for a decision (accept/reject)."""
    store = _store(c)
    claims = store.list(None if show_all else ("pending",))
    if as_json:
        click.echo(json.dumps({"claims": [{"id": x.id, "device_id": x.device_id, "status": x.status,
                                           "received_at": x.received_at, "hardware": x.hardware,
                                           "tags": list(x.tags), "reason": x.reason} for x in claims]}, indent=2))
        return
    if not claims:
        click.echo("no pending claims")
        return
    click.echo(render(["CLAIM", "DEVICE", "STATUS", "RECEIVED", "TAGS", "HARDWARE"],
                      [[x.id, x.device_id, x.status, age(x.received_at), ",".join(x.tags),
                        " ".join(f"{k}={v}" for k, v in sorted(x.hardware.items()))] for x in claims]))


def _decide(c: Ctx, refs: tuple[str, ...], all_: bool, status: str, final: tuple[str, ...], reason: str,
            wait: float, action: str) -> None:
    store = _store(c)
    claims = _resolve(store, refs, all_)
    actor = audit.actor_of(c.cfg())
    changed, skipped = [], []
    for cl in claims:
        (changed if store.decide(cl.id, status, actor, reason) else skipped).append(cl)
    for cl in skipped:
        click.echo(f"claim {cl.id} ({cl.device_id}) is {cl.status}: already decided", err=True)
    if changed:
        audit.record(c.cfg(), action, ",".join(x.device_id for x in changed), claims=[x.id for x in changed],
                     reason=reason)
    st = _wait(store, [x.id for x in changed], final, wait) if wait and changed else {}
    done = [x for x in changed if st.get(x.id) in final]
    click.echo(f"{action.split('.')[1]}ed {len(done)} of {len(changed)} claim(s)"
               + ("" if len(done) == len(changed) else "; the rest is queued for fleetctl serve"))
    if skipped and not changed:
        raise SystemExit(1)


@click.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every pending claim")
@click.option("--wait", default=60.0, show_default=True, help="seconds to wait for fleetctl serve (0: don't)")
@pass_ctx
def accept(c: Ctx, ids: tuple[str, ...], all_: bool, wait: float) -> None:
    """Accept claims: the device gets its own certificate and broker identity."""
    _decide(c, ids, all_, "accepted", ("done", "failed"), "", wait, "device.accept")


@click.command()
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every pending claim")
@click.option("--reason", default="rejected by an operator", show_default=True)
@click.option("--wait", default=60.0, show_default=True)
@pass_ctx
def reject(c: Ctx, ids: tuple[str, ...], all_: bool, reason: str, wait: float) -> None:
    """Reject claims (the board is told why)."""
    _decide(c, ids, all_, "rejecting", ("rejected",), reason, wait, "device.reject")


@click.command()
@click.argument("device_ids", nargs=-1, required=True)
@click.option("--wait", default=60.0, show_default=True)
@pass_ctx
def revoke(c: Ctx, device_ids: tuple[str, ...], wait: float) -> None:
    """Revoke devices: removed from the broker at once, renewals and new claims refused."""
    store = _store(c)
    unknown = [d for d in device_ids if store.identity(d) is None]
    if unknown:
        raise click.BadParameter(f"no provisioned device {', '.join(unknown)}", param_hint="DEVICE_IDS")
    for d in device_ids:
        store.set_identity(d, "revoking", None, None, "revoke requested")
    audit.record(c.cfg(), "device.revoke", ",".join(device_ids))
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline:
        store.db.rollback()
        if all((store.identity(d) or ("?",))[0] == "revoked" for d in device_ids):
            click.echo(f"revoked {len(device_ids)} device(s); removed from the broker")
            return
        time.sleep(0.1)
    click.echo(f"revocation of {len(device_ids)} device(s) queued for fleetctl serve")
