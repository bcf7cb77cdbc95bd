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
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus metrics on this port ([metrics] host, loopback by default; off unless set)")
@click.option("--replica", default=None, help="this replica's name when several `serve` share one fleet "
                                              "(config controller.replica; needs an MQTT 5 broker)")
@pass_ctx
def serve(c: Ctx, log_level: str, metrics_port: int | None, replica: str | None) -> None:
    """Run the controller service until SIGTERM/SIGINT."""
    cfg = c.cfg()
    if replica is not None:
        from dataclasses import replace

        try:
            cfg = replace(cfg, controller=replace(cfg.controller, replica=replica))
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--replica") from None
    setup_logging(log_level)
    asyncio.run(run_until_stopped(lambda stop: _serve(cfg, stop, metrics_port), logger=log))


async def _serve(cfg: ControllerConfig, stop: asyncio.Event, metrics_port: int | None = None) -> None:
    from ..service import ControllerService, ReplicaRefused

    try:
        svc = ControllerService(cfg, metrics_port=metrics_port)
        log.info("registry %s, broker %s%s", cfg.db_path, cfg.mqtt.broker,
                 f", replica {cfg.controller.replica}" if cfg.controller.replica else "")
        await svc.run(stop)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        sys.exit(2)
    except ReplicaRefused:
        sys.exit(2)     # logged with its reason by the service
    except OSError as exc:   # e.g. the metrics port is taken
        log.error("cannot start: %s", exc)
        sys.exit(2)
