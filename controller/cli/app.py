"""The root ``fleetctl`` group: global options, and every command group registered explicitly.

Global options (also from the environment, click's auto_envvar_prefix):
``--broker`` / FLEETCTL_BROKER, ``--config`` / FLEETCTL_CONFIG, ``--registry`` / FLEETCTL_REGISTRY
(``postgresql://…``, ``sqlite:///path`` or a path; ``--db`` / FLEETCTL_DB is its older name).
Reads (`devices`, `device show`, `telemetry`) come from the registry that
`fleetctl serve` writes; live views (`telemetry --follow`, `cmd`) use the broker.
``--json`` output is stable and documented in docs/cli.md.
"""
from __future__ import annotations

import click

from .audit_cmd import audit
from .certs import certs
from .context import Ctx
from .demo import demo
from .deploy import deploy, rollback, rollout, tag
from .devices import cmd, device, devices, feedback_cmd, infer_cmd, telemetry
from .keys import keys
from .lineage import lineage
from .logs import logs
from .model import model
from .offload import offload, offload_worker
from .patch import patch
from .provision import devices_group
from .report import report
from .params import BROKER_HELP, BROKER_URL
from .round import round  # noqa: A004 - the command group is called "round"
from .serve import serve
from .site import site
from .status import status


@click.group(context_settings={"auto_envvar_prefix": "FLEETCTL", "help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(dir_okay=False), default=None, help="controller TOML config")
@click.option("--broker", default=None, type=BROKER_URL, help=BROKER_HELP)
@click.option("--registry", "registry_url", default=None, metavar="URL", envvar="FLEETCTL_REGISTRY",
              help="registry: postgresql://user@host/db, sqlite:///path or a file path (overrides config)")
@click.option("--db", default=None, help="registry SQLite file (older name of --registry)")
@click.option("--topic-root", default=None, help="topic root (default edgefleet)")
@click.option("--signing-key", default=None, type=click.Path(dir_okay=False),
              help="Ed25519 private key that signs commands (fleetctl keys init)")
@click.version_option("0.1.0", prog_name="fleetctl")
@click.pass_context
def cli(ctx: click.Context, config: str | None, broker: str | None, registry_url: str | None, db: str | None,
        topic_root: str | None, signing_key: str | None) -> None:
    """edgefleet's fleet controller and CLI."""
    if registry_url and db and registry_url != db:
        raise click.UsageError("--registry and --db name two registries: give one")
    ctx.obj = Ctx(config, broker, registry_url or db, topic_root, signing_key)


device.add_command(tag)
model.add_command(lineage)
cli.add_command(serve)
cli.add_command(devices_group(devices))
cli.add_command(status)
cli.add_command(device)
cli.add_command(telemetry)
cli.add_command(cmd)
cli.add_command(infer_cmd)
cli.add_command(feedback_cmd)
cli.add_command(demo)
cli.add_command(deploy)
cli.add_command(rollout)
cli.add_command(rollback)
cli.add_command(round)
cli.add_command(report)
cli.add_command(offload)
cli.add_command(offload_worker)
cli.add_command(model)
cli.add_command(patch)
cli.add_command(keys)
cli.add_command(certs)
cli.add_command(audit)
cli.add_command(logs)
cli.add_command(site)


def main() -> None:
    cli(prog_name="fleetctl")
