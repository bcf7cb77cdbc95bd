"""``fleetctl serve``: the controller service, in the shared lifecycle (protocol/lifecycle.py)."""
from __future__ import annotations

import asyncio
import logging
import sys

import click

from protocol.lifecycle import run_until_stopped

from ..config import ConfigError, ControllerConfig
from .context import Ctx, pass_ctx, setup_logging

log = logging.getLogger("fleetctl")


@click.command()
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@pass_ctx
def serve(c: Ctx, log_level: str) -> None:
    """Run the controller service until SIGTERM/SIGINT."""
    cfg = c.cfg()
    _check_signing_key(cfg.security.signing_key)
    setup_logging(log_level)
    asyncio.run(run_until_stopped(lambda stop: _serve(cfg, stop), logger=log))


def _check_signing_key(path: str | None) -> None:
    """A missing or unreadable key: one line naming the file and what to run, exit 2 (before any
    logging or connection: under systemd it is the whole journal entry)."""
    from ..channel import load_signing_key

    try:
        load_signing_key(path)
    except ConfigError as exc:
        click.echo(f"fleetctl serve: {exc}; make a key pair with `fleetctl keys init --dir DIR` and pass "
                   f"--signing-key DIR/controller.pem (or set [security] signing_key)", err=True)
        sys.exit(2)


async def _serve(cfg: ControllerConfig, stop: asyncio.Event) -> None:
    from ..service import ControllerService

    try:
        svc = ControllerService(cfg)
        log.info("registry %s, broker %s", cfg.db_path, cfg.mqtt.broker)
        await svc.run(stop)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        sys.exit(2)
