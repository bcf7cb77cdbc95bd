"""``fleetctl site``: the site tier (docs/sites.md). ``bridge-config`` writes a site broker's bridge.

The bridge rules are one table (``protocol.sites.RULES``); this command only renders it for one
site, checked, and writes it atomically (``-o FILE``) or prints it.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from .context import Ctx, pass_ctx


@click.group()
def site() -> None:
    """Sites: a Mosquitto per site bridged to the centre, a relay on its gateway (docs/sites.md)."""


def _readable(path: str, what: str) -> str:
    if path and not os.access(path, os.R_OK):
        raise click.BadParameter(f"{path}: not a readable file", param_hint=what)
    return path


@site.command("bridge-config")
@click.argument("site_name", metavar="SITE")
@click.option("--centre", default="127.0.0.1:1883", show_default=True, metavar="HOST:PORT",
              help="the central broker as the site reaches it (its TLS listener when --tls-ca is given)")
@click.option("--tls-ca", default="", help="CA file of the centre's broker certificate (TLS to the centre)")
@click.option("--cert", default="", help="the site bridge's client certificate (with --key)")
@click.option("--key", "key_file", default="", help="the site bridge's private key (with --cert)")
@click.option("--boards-from-registry", is_flag=True,
              help="name each board the registry knows behind SITE in the downlink rules instead of "
                   "dev/+/… (no other site's commands or chunks cross this uplink; regenerate when boards "
                   "join the site)")
@click.option("--board", "boards", multiple=True, help="a board of the site (repeatable; like --boards-from-registry)")
@click.option("--relay-fl", is_flag=True,
              help="the site's relay runs the fl component: boards' federated updates stay on the site and the "
                   "relay sends one aggregate per round (without it they cross the bridge one by one — a site "
                   "with no relay must not use this, or its updates reach nobody)")
@click.option("-o", "--output", "output", default=None, type=click.Path(dir_okay=False),
              help="write here (atomically) instead of printing; e.g. /etc/mosquitto/conf.d/edgefleet-bridge.conf")
@pass_ctx
def bridge_config_cmd(c: Ctx, site_name: str, centre: str, tls_ca: str, cert: str, key_file: str,
                      boards_from_registry: bool, boards: tuple[str, ...], relay_fl: bool,
                      output: str | None) -> None:
    """The Mosquitto bridge section for SITE's broker: what goes up, what comes down, what stays."""
    from protocol.sites import BridgeSettings, bridge_config, rules_without_relay_fl

    _readable(tls_ca, "--tls-ca")
    _readable(cert, "--cert")
    _readable(key_file, "--key")
    names = list(boards)
    if boards_from_registry:
        reg = c.registry()
        names += [d.id for d in reg.devices()
                  if getattr(d, "site", None) == site_name and (d.state or {}).get("role") != "relay"]
        if not names:
            raise click.ClickException(f"the registry knows no board behind site {site_name!r}")
    try:
        settings = BridgeSettings(site=site_name, centre=centre, root=c.cfg().mqtt.topic_root, tls_ca=tls_ca,
                                  cert=cert, key=key_file, boards=tuple(dict.fromkeys(names)))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    text = bridge_config(settings, None if relay_fl else rules_without_relay_fl())
    if output is None:
        click.echo(text, nl=False)
        return
    from protocol.atomicfile import write_atomic

    try:
        write_atomic(Path(output), text)
    except OSError as exc:
        raise click.ClickException(f"{output}: {exc.strerror or exc}") from None
    click.echo(f"wrote the bridge for site {site_name} to {output}", err=True)
