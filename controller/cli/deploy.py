"""``fleetctl deploy``, ``fleetctl rollout …``, ``fleetctl rollback`` and ``fleetctl device tag``.

The CLI stores the artifact and writes the rollout into the registry's SQLite file;
``fleetctl serve`` runs it (waves, offers, chunks, aborts). ``--wait`` follows it
with a progress bar and exits non-zero when the rollout aborted.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from .. import audit
from .select import site_callback, ids_of, pick, selection_options, site_selected
from .params import DEVICE_ID, DURATION, POSITIVE_DURATION, FRACTION, TAG


def _store(ctx: click.Context):
    from ..rollouts.store import RolloutStore

    cfg = ctx.obj.cfg()
    path = cfg.db_path
    if cfg.db_is_sqlite and not os.path.exists(path):
        raise click.ClickException(f"no registry at {path} (is `fleetctl serve` running with this --db?)")
    from ..db import DatabaseUnavailable

    try:
        return RolloutStore.open(path, cfg.artifacts_dir)
    except DatabaseUnavailable as exc:
        raise click.ClickException(str(exc)) from None


def select_devices(ctx: click.Context, store: Any, to: Any, group: str | None, tag: str | None,
                   all_: bool) -> list[Any]:
    """Registry devices picked by id list, group, tag or all; online ones first (``select.pick``)."""
    return pick(ctx.obj.registry(), to, group, tag, all_, store.devices_with_tag)


def _policy_options(f):
    for opt in reversed([
        click.option("--canary", default="10%", show_default=True, type=FRACTION, help="share of devices in the first wave"),
        click.option("--batch", default=0, show_default=True, type=click.IntRange(0),
                     help="devices per wave after the canary (0 = all the rest at once)"),
        click.option("--by-site", is_flag=True, default=False,
                     help="waves by site: the canary is one board per site, then --sites-per-wave sites a "
                          "wave (docs/sites.md); --canary 0 skips the canary, --batch does not apply"),
        click.option("--sites-per-wave", default=1, show_default=True, type=click.IntRange(1),
                     help="with --by-site: sites released together after the canary"),
        click.option("--max-failures", default=0, show_default=True, type=click.IntRange(0),
                     help="abort and roll the rollout back when more devices fail"),
        click.option("--wave-timeout", default="10m", show_default=True, type=POSITIVE_DURATION,
                     help="an online device that has not finished by then counts as failed"),
        click.option("--soak", default="60s", show_default=True, type=DURATION,
                     help="a finished wave counts as healthy only after this long on the new version; fleet "
                          "confidence, error rate and latency are gathered over it (0 = no soak)"),
        click.option("--max-confidence-drop", default=None, type=click.FloatRange(0, 1),
                     help="abort when the updated devices' live mean confidence falls by more"),
        click.option("--max-accuracy-drop", default=None, type=click.FloatRange(0, 1),
                     help="abort when the updated devices' shadow-evaluation accuracy falls by more, on average"),
        click.option("--wait/--no-wait", default=False, help="follow the rollout until it ends"),
        click.option("--timeout", "wait_timeout", default="30m", show_default=True, type=POSITIVE_DURATION,
                     help="with --wait: give up after"),
        click.option("--json", "as_json", is_flag=True),
    ]):
        f = opt(f)
    return f


def _policy(**kw: Any) -> Any:
    """The rollout policy, checked before anything is stored (a bad value creates nothing)."""
    from ..rollouts.policy import RolloutConfigError, RolloutPolicy

    try:
        return RolloutPolicy(**kw)
    except RolloutConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _create(store: Any, version: str, sha: str, devices: list[Any], policy: Any, selector: dict[str, Any],
            kind: str = "ro", artifact_id: str | None = None) -> str:
    from ..rollouts.policy import plan_site_waves, plan_waves

    if getattr(policy, "by_site", False):
        waves = plan_site_waves([(d.id, getattr(d, "site", None)) for d in devices], policy.sites_per_wave,
                                canary=policy.canary > 0)
    else:
        waves = plan_waves([d.id for d in devices], policy.canary, policy.batch)
    current = {}
    for d in devices:
        m = (d.state or {}).get("model") or {}
        current[d.id] = (m.get("bundle_sha256"), m.get("version")) if isinstance(m, dict) else (None, None)
    rid = time.strftime(f"{kind}-%Y%m%d-%H%M%S-") + os.urandom(2).hex()
    store.create_rollout(rid, version, sha, policy.to_dict(), selector, waves, current, artifact_id=artifact_id)
    return rid


@click.command()
@click.argument("artifact", type=click.Path(exists=True))
@click.option("--from", "bases", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="a bundle devices may run now, so head-only patches can be made from it (repeatable)")
@selection_options
@_policy_options
@click.pass_context
def deploy(ctx: click.Context, artifact: str, bases: tuple[str, ...], to: tuple[str, ...], group: str | None,
           tag: str | None, all_: bool, canary: float, batch: int, max_failures: int, wave_timeout: float,
           soak: float, max_confidence_drop: float | None, max_accuracy_drop: float | None, wait: bool, wait_timeout: float,
           as_json: bool, by_site: bool = False, sites_per_wave: int = 1) -> None:
    """Roll a bundle directory or a patch file out to devices, canary first (--by-site: by site)."""
    from protocol.patch import PatchError

    # every flag and the device selection are checked before the artifact or the rollout is stored
    policy = _policy(canary=canary, batch=batch, max_failures=max_failures, wave_timeout_s=wave_timeout,
                     max_confidence_drop=max_confidence_drop, max_accuracy_drop=max_accuracy_drop,
                     soak_s=soak, by_site=by_site, sites_per_wave=sites_per_wave)
    store = _store(ctx)
    devices = select_devices(ctx, store, to, group, tag, all_)
    try:
        for b in bases:
            store.add_bundle(b)
        art = store.add_bundle(artifact) if Path(artifact).is_dir() else store.add_patch(Path(artifact).read_bytes())
    except (PatchError, OSError) as exc:
        raise click.ClickException(f"{artifact}: {exc}") from None
    if art.quarantined is not None:
        raise click.ClickException(f"{artifact}: artifact {art.id[:12]} is quarantined, it is never offered again "
                                   f"({art.quarantine_reason})")
    if art.kind == "bundle" and not ctx.obj.cfg().security.signing_key:
        click.echo("warning: no --signing-key: fleetctl serve must have one to make patches from a bundle",
                   err=True)
    rid = _create(store, art.version, art.bundle_sha256, devices, policy,
                  {"to": ids_of(to), "group": group, "tag": tag, "all": all_, "artifact": art.id,
                   **({"site": site_selected()} if site_selected() else {})}, artifact_id=art.id)
    audit.cli_hook("deploy", art.version, rollout=rid, artifact=art.id, devices=[d.id for d in devices])
    _report_created(store, rid, art.version, len(devices), as_json, wait)
    if wait:
        _follow(store, rid, wait_timeout, as_json)


def _report_created(store: Any, rid: str, version: str, n: int, as_json: bool, wait: bool) -> None:
    r = store.rollout(rid)
    if as_json and not wait:
        click.echo(json.dumps(rollout_json(store, r), indent=2))
    else:
        sizes = "+".join(str(sum(1 for s in store.slots(rid) if s.wave == w)) for w in range(r.waves))
        click.echo(f"{rid}: {version} to {n} device(s) in {r.waves} wave(s) ({sizes}); fleetctl serve runs it",
                   err=as_json)


def _artifact_json(a: Any) -> dict[str, Any]:
    return {"id": a.id, "kind": a.kind, "version": a.version, "base_sha256": a.base_sha256, "size": a.size,
            "made_by_controller": a.made_from is not None, "quarantined": a.quarantined is not None,
            "quarantined_at": a.quarantined, "quarantine_reason": a.quarantine_reason}


def rollout_json(store: Any, r: Any) -> dict[str, Any]:
    slots = store.slots(r.id)
    counts: dict[str, int] = {}
    for s in slots:
        counts[s.status] = counts.get(s.status, 0) + 1
    own = store.artifact(r.artifact_id) if r.artifact_id else None
    return {"rollout_id": r.id, "status": r.status, "version": r.version, "bundle_sha256": r.bundle_sha256,
            "created": r.created, "finished": r.finished, "wave": r.wave, "waves": r.waves, "reason": r.reason,
            "policy": r.policy, "selector": r.selector, "figures": r.figures, "counts": counts,
            "soak_started": r.soak_started, "paused_at": r.paused_at, "keep_updated": r.keep_updated,
            "devices": [{"device": s.device_id, "wave": s.wave, "status": s.status, "reason": s.reason,
                         "from_version": s.from_version, "conf_before": s.conf_before, "conf_after": s.conf_after,
                         "acc_before": s.acc_before, "acc_after": s.acc_after}
                        for s in slots],
            "artifact": _artifact_json(own) if own is not None else None,
            "quarantined": [_artifact_json(a) for a in store.quarantined_for(r.bundle_sha256)]}


def _follow(store: Any, rid: str, timeout: float, as_json: bool) -> None:
    from ..rollouts.policy import FINAL

    deadline = time.monotonic() + timeout
    n = len(store.slots(rid))
    with click.progressbar(length=n, label=rid, file=sys.stderr, show_pos=True) as bar:
        done = 0
        while time.monotonic() < deadline:
            store.refresh()  # see the service's writes
            r = store.rollout(rid)
            fin = sum(1 for s in store.slots(rid) if s.status in FINAL)
            if fin > done:
                bar.update(fin - done)
                done = fin
            if r.status in ("done", "aborted"):   # paused or aborting: still going
                break
            time.sleep(0.3)
    r = store.rollout(rid)
    out = rollout_json(store, r)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        _print(out)
    if r.status != "done":
        if r.status not in ("done", "aborted"):
            click.echo(f"{rid}: still {r.status} after --timeout {timeout:g}s (fleetctl rollout status {rid})",
                       err=True)
        sys.exit(1)


def _print(s: dict[str, Any]) -> None:
    from ..table import fmt, render

    click.echo(f"{s['rollout_id']}: {s['status']}  {s['version']}  wave {s['wave'] + 1}/{s['waves']}"
               + (f"  ({s['reason']})" if s["reason"] else ""))
    click.echo(render(["DEVICE", "WAVE", "STATUS", "FROM", "CONF BEFORE", "CONF AFTER", "REASON"],
                      [[d["device"], d["wave"] + 1, d["status"], d["from_version"] or "-", d["conf_before"],
                        d["conf_after"], (d["reason"] or "")[:70]] for d in s["devices"]]))
    fleet = (s.get("figures") or {}).get("fleet") or {}
    if fleet.get("devices"):
        click.echo(f"fleet on {s['version']}: {fleet['devices']} device(s), {fleet.get('inferences', 0)} inferences, "
                   f"mean confidence {fmt(fleet.get('mean_confidence'))}, error rate {fmt(fleet.get('error_rate'))}, "
                   f"p95 {fmt(fleet.get('p95_latency_ms'))} ms"
                   + (f"; soaking, {fmt(s['figures']['soak_left_s'])} s left" if "soak_left_s" in s["figures"] else ""))
    for a in s.get("quarantined") or []:
        mine = " (this rollout's artifact)" if s.get("artifact") and s["artifact"]["id"] == a["id"] else ""
        click.echo(f"quarantined: {a['kind']} {a['id'][:12]} for {a['version']}{mine}: {a['quarantine_reason']}")


@click.group()
def rollout() -> None:
    """Model rollouts: status and history."""


@rollout.command("status")
@click.argument("rollout_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollout_status(ctx: click.Context, rollout_id: str | None, as_json: bool) -> None:
    """The newest (or the given) rollout, device by device."""
    store = _store(ctx)
    r = store.rollout(rollout_id) if rollout_id else next(iter(store.rollouts(limit=1)), None)
    if r is None:
        raise click.ClickException(f"no rollout {rollout_id!r}" if rollout_id else "no rollouts yet")
    out = rollout_json(store, r)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        _print(out)


@rollout.command("list")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollout_list(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Rollouts, newest first."""
    from ..table import render

    store = _store(ctx)
    rows = store.rollouts(limit=limit)
    if as_json:
        click.echo(json.dumps({"rollouts": [rollout_json(store, r) for r in rows]}, indent=2))
        return
    click.echo(render(["ROLLOUT", "STATUS", "VERSION", "WAVE", "REASON"],
                      [[r.id, r.status, r.version, f"{r.wave + 1}/{r.waves}", (r.reason or "")[:60]] for r in rows]))


@click.command()
@click.option("--version", "to_version", default=None, help="the version to return to")
@click.option("--to", default=None, help="device ids, comma-separated (before 0.2: the version; see below)")
@click.option("--devices", "devices_old", default=None, hidden=True, help="deprecated spelling of --to IDS")
@click.option("--group", default=None, help="every device of this group")
@click.option("--tag", default=None, help="every device with this tag")
@click.option("--site", default=None, expose_value=False, callback=site_callback,
              help="every device behind this site")
@click.option("--all", "all_", is_flag=True, help="every known device")
@click.option("--wait/--no-wait", default=False, help="follow the rollback until it ends")
@click.option("--timeout", "wait_timeout", default="10m", show_default=True, type=POSITIVE_DURATION,
              help="with --wait: give up after")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollback(ctx: click.Context, to_version: str | None, to: str | None, devices_old: str | None, group: str | None,
             tag: str | None, all_: bool, wait: bool, wait_timeout: float, as_json: bool) -> None:
    """Send devices back to --version (kept on the device, or shipped again from the artifact store).

    Devices are picked as for deploy: --to IDS, --group, --tag or --all. The old spellings
    `rollback --to VERSION --devices IDS|--group G|--tag T|--all` still work (with a warning)
    where they cannot be confused: no --version, and the devices picked by another option."""
    others = sum(x is not None and x is not False for x in (group, tag, all_ or None))
    if devices_old is None and to_version is None and to is not None and others == 1:
        click.echo("warning: `rollback --to VERSION` is deprecated: use --version VERSION (--to picks devices)",
                   err=True)
        to_version, to = to, None
    if devices_old is not None:
        if to_version is not None or to is None:
            raise click.UsageError("--devices is the old spelling of --to: use --version VERSION --to IDS")
        click.echo("warning: `rollback --to VERSION --devices IDS` is deprecated: use --version VERSION --to IDS",
                   err=True)
        to_version, to = to, devices_old
    if to_version is None:
        raise click.UsageError("give the version to return to with --version")
    store = _store(ctx)
    devices = select_devices(ctx, store, to, group, tag, all_)
    sha = None
    art = store.artifact_by_version(to_version)
    if art is not None:
        sha = art.bundle_sha256
    for d in devices:
        for i in ((d.state or {}).get("model") or {}).get("installed") or []:
            if isinstance(i, dict) and i.get("version") == to_version:
                sha = sha or i.get("bundle_sha256")
    if not sha:
        raise click.ClickException(f"version {to_version!r} is neither in the artifact store nor kept on those devices")
    policy = _policy(canary=0.0, batch=0, max_failures=len(devices), wave_timeout_s=600.0)
    rid = _create(store, to_version, sha, devices, policy,
                  {"to": ids_of(to), "group": group, "tag": tag, "all": all_, "rollback": True}, kind="rb")
    audit.cli_hook("rollback", to_version, rollout=rid, devices=[d.id for d in devices])
    _report_created(store, rid, to_version, len(devices), as_json, wait)
    if wait:
        _follow(store, rid, wait_timeout, as_json)


def _control(ctx: click.Context, rollout_id: str, as_json: bool, act: Any, verb: str, allowed: str) -> None:
    store = _store(ctx)
    r = store.rollout(rollout_id)
    if r is None:
        raise click.ClickException(f"no rollout {rollout_id!r}")
    if not act(store):
        raise click.ClickException(f"{rollout_id} is {r.status}: only a {allowed} rollout can be {verb}")
    audit.cli_hook(f"rollout.{verb}", rollout_id)
    r = store.rollout(rollout_id)
    if as_json:
        click.echo(json.dumps(rollout_json(store, r), indent=2))
    else:
        click.echo(f"{rollout_id}: {r.status}" + (f" ({r.reason})" if r.status == "aborting" else ""))


@rollout.command("pause")
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollout_pause(ctx: click.Context, rollout_id: str, as_json: bool) -> None:
    """Hold ROLLOUT_ID: no further wave starts; devices already released finish their update.

    The wave timeout and the soak stop counting while paused; `rollout resume` carries on."""
    _control(ctx, rollout_id, as_json, lambda st: st.pause(rollout_id), "paused", "running")


@rollout.command("resume")
@click.argument("rollout_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollout_resume(ctx: click.Context, rollout_id: str, as_json: bool) -> None:
    """Carry on with a paused ROLLOUT_ID where it stopped."""
    _control(ctx, rollout_id, as_json, lambda st: st.resume(rollout_id), "resumed", "paused")


@rollout.command("abort")
@click.argument("rollout_id")
@click.option("--keep-updated", is_flag=True,
              help="leave devices that already applied the new version on it (default: send them back)")
@click.option("--reason", default="aborted by the operator", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rollout_abort(ctx: click.Context, rollout_id: str, keep_updated: bool, reason: str, as_json: bool) -> None:
    """Stop ROLLOUT_ID: no further wave; devices not yet released keep their version (skipped);
    devices released or updated are sent back to the version they ran before, unless --keep-updated
    (then only those still mid-update go back). Recorded at once; `fleetctl serve` carries it out."""
    _control(ctx, rollout_id, as_json, lambda st: st.request_abort(rollout_id, reason, keep_updated), "aborted",
             "running or paused")


@click.command("tag")
@click.argument("device_id", type=DEVICE_ID)
@click.argument("tags", nargs=-1, required=True, type=TAG)
@click.option("--remove", is_flag=True, help="remove these tags instead")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def tag(ctx: click.Context, device_id: str, tags: tuple[str, ...], remove: bool, as_json: bool) -> None:
    """Tag a device (deploy --tag T targets every device with tag T)."""
    store = _store(ctx)
    for t in tags:
        store.tag(device_id, t, remove=remove)
    now = store.tags(device_id).get(device_id, [])
    if as_json:
        click.echo(json.dumps({"device": device_id, "tags": now}))
    else:
        click.echo(f"{device_id}: {', '.join(now) or 'no tags'}")
