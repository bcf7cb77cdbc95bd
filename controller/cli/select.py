"""One way to pick devices for every ``fleetctl`` command that acts on several of them:
``--to ID[,ID…]`` (repeatable) / ``--group G`` / ``--tag T`` / ``--site S`` / ``--all`` — exactly one.

``--site`` is read from the click context (``site_selected``), so commands that take the selection
options need no extra parameter for it.

deploy, rollback, offload set and cmd use it; ids are checked as topic levels and against the
registry at parse time of the command, before anything is sent or stored.
"""
from __future__ import annotations

from typing import Any, Callable

import click

DEVICE_COMMANDS = {
    "ping": "liveness and agent uptime",
    "describe": "the device's state, config source and the commands it accepts",
    "telemetry.now": "publish telemetry now",
    "model.describe": "the serving model, installed versions",
    "model.rollback": "switch to a kept version (args: bundle_sha256 or version)",
    "offload.set": "offload policy (args: threshold, mode, deadline_ms, enabled)",
    "offload.status": "offload figures",
    "learn.start|stop|now|status": "on-device learning (when [learning] is on)",
    "mcu.push|status": "the MCU bridge (when [mcu] is configured)",
    "logs.get|follow": "the board's recent log records (fleetctl logs DEVICE [--follow])",
    "cert.install|refused": "certificate rotation answers from the controller (sent by fleetctl serve)",
}


def device_command_names() -> set[str]:
    """Every name in ``DEVICE_COMMANDS`` (``a.b|c`` → ``a.b``, ``a.c``)."""
    out = set()
    for k in DEVICE_COMMANDS:
        head, _, rest = k.partition("|")
        out.add(head)
        prefix = head.rsplit(".", 1)[0] + "." if "." in head else ""
        out.update(prefix + r for r in rest.split("|") if r)
    return out


def commands_epilog() -> str:
    """The commands an agent accepts (agent/app.py built-ins and its features), for ``cmd --help``."""
    width = max(len(k) for k in DEVICE_COMMANDS)
    lines = [f"  {k.ljust(width)}  {v}" for k, v in DEVICE_COMMANDS.items()]
    return ("\b\nCommands a device accepts (`fleetctl cmd DEVICE describe` lists that device's own):\n"
            + "\n".join(lines))


def checked_ids(to: tuple[str, ...]) -> list[str] | None:
    """The ``--to`` ids, each checked as a topic level (None when --to was not given)."""
    from protocol.topics import InvalidId, validate_id

    ids = ids_of(to)
    for i in ids or ():
        try:
            validate_id(i)
        except InvalidId as exc:
            raise click.BadParameter(str(exc), param_hint="--to") from None
    return ids


SITE_KEY = "select.site"


def site_callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        from protocol.topics import InvalidId, validate_id

        try:
            validate_id(value, "site")
        except InvalidId as exc:
            raise click.BadParameter(str(exc), param_hint="--site") from None
        ctx.meta[SITE_KEY] = value
    return value


def site_selected() -> str | None:
    """The ``--site`` of the running command (None when not given or outside click)."""
    ctx = click.get_current_context(silent=True)
    return ctx.meta.get(SITE_KEY) if ctx is not None else None


def selection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """``--to``, ``--group``, ``--tag``, ``--all`` (passed as ``to``, ``group``, ``tag``, ``all_``) and
    ``--site`` (kept in the click context: ``site_selected()``)."""
    for opt in reversed([
        click.option("--to", "to", multiple=True, help="device ids, comma-separated or repeated"),
        click.option("--group", default=None, help="every device of this group"),
        click.option("--tag", default=None, help="every device with this tag (fleetctl device tag)"),
        click.option("--site", default=None, expose_value=False, callback=site_callback,
                     help="every device behind this site (its agent config's device.site)"),
        click.option("--all", "all_", is_flag=True, help="every known device"),
    ]):
        f = opt(f)
    return f


def ids_of(to: tuple[str, ...] | str | None) -> list[str] | None:
    """``--to a,b --to c`` → ``["a", "b", "c"]``; None when not given."""
    if not to:
        return None
    parts = [to] if isinstance(to, str) else list(to)
    return [i.strip() for p in parts for i in p.split(",") if i.strip()]


def pick(reg: Any, to: tuple[str, ...] | str | None, group: str | None, tag: str | None, all_: bool,
         tagged: Callable[[str], list[str]] | None = None, site: str | None = None) -> list[Any]:
    """Registry devices picked by exactly one selector; online ones first. ``tagged(tag)``: device ids
    with that tag (the rollout store's tags; none before the first ``device tag``)."""
    ids = checked_ids(to)
    site = site if site is not None else site_selected()
    if sum(x is not None and x is not False for x in (ids, group, tag, site, all_ or None)) != 1:
        raise click.UsageError("pick the devices with exactly one of --to, --group, --tag, --site or --all")
    devs = {d.id: d for d in reg.devices()}
    if ids is not None:
        unknown = [i for i in ids if i not in devs]
        if unknown:
            raise click.BadParameter(f"unknown device(s): {', '.join(unknown)}", param_hint="--to")
        picked = [devs[i] for i in dict.fromkeys(ids)]
        return sorted(picked, key=lambda d: (not d.online, d.id))
    # a site relay (agent/relay) is a gateway, not a board: only --to picks it
    devs = {i: d for i, d in devs.items() if ((d.state or {}).get("role") != "relay")}
    if group is not None:
        picked = [d for d in devs.values() if d.group == group]
    elif tag is not None:
        picked = [devs[i] for i in (tagged(tag) if tagged else []) if i in devs]
    elif site is not None:
        picked = [d for d in devs.values() if getattr(d, "site", None) == site]
    else:
        picked = list(devs.values())
    if not picked:
        raise click.ClickException("no device matches")
    return sorted(picked, key=lambda d: (not d.online, d.id))


def tags_reader(reg: Any) -> Callable[[str], list[str]]:
    from ..rollouts.store import RolloutStore

    store = RolloutStore.reader(reg.db)
    return store.devices_with_tag if store is not None else (lambda tag: [])


def target_ids(c: Any, to: tuple[str, ...] | str | None, group: str | None, tag: str | None, all_: bool,
               online_only: bool = False) -> list[str]:
    """Device ids for a command sent over the broker: ``--to`` ids need no registry (they are checked
    as topic levels and asked even when they look offline); the other selectors read the registry
    (``online_only``: only the devices online there)."""
    from protocol.topics import InvalidId, validate_id

    ids = ids_of(to)
    if ids is not None and not (group or tag or all_ or site_selected()):
        for i in ids:
            try:
                validate_id(i)
            except InvalidId as exc:
                raise click.BadParameter(str(exc), param_hint="--to") from None
        return list(dict.fromkeys(ids))
    reg = c.registry()
    picked = pick(reg, to, group, tag, all_, tags_reader(reg))
    out = [d.id for d in picked if d.online or not online_only]
    if not out:
        raise click.ClickException("no online device matches")
    return out
