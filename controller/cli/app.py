"""The root ``fleetctl`` group: global options, and every command, loaded when it runs (cli/lazy.py).

Global options (also from the environment, click's auto_envvar_prefix):
``--broker`` / FLEETCTL_BROKER, ``--config`` / FLEETCTL_CONFIG, ``--registry`` / FLEETCTL_REGISTRY
(``postgresql://…``, ``sqlite:///path`` or a path; ``--db`` / FLEETCTL_DB is its older name).
Reads (`devices`, `device show`, `telemetry`) come from the registry that
`fleetctl serve` writes; live views (`telemetry --follow`, `cmd`) use the broker.
``--json`` output is stable and documented in docs/cli.md.
"""
from __future__ import annotations

import click

from .context import Ctx
from .lazy import Lazy, LazyGroup
from .params import BROKER_HELP, BROKER_URL

_C = "controller.cli."
#: every command, imported only when it runs (the summaries are what ``fleetctl --help`` lists)
COMMANDS: dict[str, Lazy] = {
    "serve": Lazy(_C + "serve:serve", "Run the controller service until SIGTERM/SIGINT."),
    "devices": Lazy(_C + "app:_devices", "List devices: id, online, last seen, model, key metrics."),
    "status": Lazy(_C + "status:status",
                   "The controller: devices online, messages in, stored, duplicates, rejects, shed."),
    "device": Lazy(_C + "app:_device", "One device."),
    "telemetry": Lazy(_C + "devices:telemetry", "Recent telemetry from the registry, or live with --follow."),
    "cmd": Lazy(_C + "devices:cmd",
                "Send COMMAND to DEVICE_ID (or to --to/--group/--tag/--all) and print the replies."),
    "infer": Lazy(_C + "devices:infer_cmd",
                  "Ask DEVICE_ID for one inference (request/response over MQTT; tensors as a binary frame)."),
    "feedback": Lazy(_C + "devices:feedback_cmd",
                     "Label an earlier inference REQUEST_ID on DEVICE_ID (on-device learning uses it)."),
    "demo": Lazy(_C + "demo:demo", "Embedded broker + controller + N agents, with the fleet shown live."),
    "deploy": Lazy(_C + "deploy:deploy", "Roll a bundle directory or a patch file out to devices, canary first "
                                         "(--by-site: by site)."),
    "rollout": Lazy(_C + "deploy:rollout", "Model rollouts: status and history."),
    "rollback": Lazy(_C + "deploy:rollback", "Send devices back to --version (kept on the device, or shipped "
                                             "again from the artifact store)."),
    "round": Lazy(_C + "round:round", "Federated rounds: start, status, history."),
    "report": Lazy(_C + "report:report", "Reports (PNG needs: pip install 'edgefleet[report]')."),
    "offload": Lazy(_C + "offload:offload", "Offload policy on devices, and fleet-wide offload figures."),
    "offload-worker": Lazy(_C + "offload:offload_worker",
                           "Serve offloaded requests with BUNDLE: deadline-ordered, hopeless requests refused "
                           "at once."),
    "model": Lazy(_C + "app:_model",
                  "Model bundles: import, inspect, build-example, quantize, split, exits, bottleneck, "
                  "set-backbone, add-data."),
    "patch": Lazy(_C + "patch:patch", "Signed model patches (only what changed between two bundle versions)."),
    "keys": Lazy(_C + "keys:keys", "Signing keys (Ed25519): agents trust the public key in their config."),
    "certs": Lazy(_C + "certs:certs", "TLS certificates for the broker (mTLS: the cert's CN is the device id)."),
    "audit": Lazy(_C + "audit_cmd:audit",
                  "Every operator action that changed the fleet: when, who (signing key / certificate), what."),
    "logs": Lazy(_C + "logs:logs", "A board's recent log records (from its own ring), and live with --follow."),
    "site": Lazy(_C + "site:site", "Sites: a Mosquitto per site bridged to the centre, a relay on its gateway "
                                   "(docs/sites.md)."),
}


def _devices() -> click.Command:
    from .devices import devices
    from .provision import devices_group

    return devices_group(devices)


def _device() -> click.Command:
    from .deploy import tag
    from .devices import device

    if "tag" not in device.commands:
        device.add_command(tag)
    return device


def _model() -> click.Command:
    from .lineage import lineage
    from .model import model

    if "lineage" not in model.commands:
        model.add_command(lineage)
    return model


@click.group(cls=LazyGroup, lazy=COMMANDS,
             context_settings={"auto_envvar_prefix": "FLEETCTL", "help_option_names": ["-h", "--help"]})
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


def main() -> None:
    cli(prog_name="fleetctl")
