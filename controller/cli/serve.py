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
    setup_logging(log_level)
    asyncio.run(run_until_stopped(lambda stop: _serve(cfg, stop), logger=log))


async def _serve(cfg: ControllerConfig, stop: asyncio.Event) -> None:
    from ..registry import RegistryError
    from ..service import ControllerService

    try:
        svc = ControllerService(cfg)
        from ..db import parse_url

        log.info("registry %s, broker %s", parse_url(cfg.db_path).display(), cfg.mqtt.broker)
        await svc.run(stop)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        sys.exit(2)
    except RegistryError as exc:   # e.g. the PostgreSQL server is not reachable at start
        log.error("registry: %s", exc)
        sys.exit(2)
