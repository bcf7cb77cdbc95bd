"""``fleetctl serve``: the controller service, in the shared lifecycle (protocol/lifecycle.py).

One ``serve`` per registry unless the operator asks for replicas (``--replica``): two controllers
on one SQLite file under one broker identity push each other off the broker every half second
and fight over the file. The guard is an ``fcntl`` lock next to the registry
(protocol/instancelock.py); ``instance_lock_path`` is the hook a shared registry (PostgreSQL,
where replicas coordinate through leases) answers with None.
"""
from __future__ import annotations

import asyncio
import logging
import sys

import click

from protocol.instancelock import InstanceLock, LockHeld
from protocol.lifecycle import run_until_stopped

from ..config import ConfigError, ControllerConfig
from .context import Ctx, pass_ctx, setup_logging

log = logging.getLogger("fleetctl")

#: sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus=78 (fail once with the reason, no restart loop)
EX_CONFIG = 78


def instance_lock_path(cfg: ControllerConfig) -> str | None:
    """Where the single-instance lock lives: beside a registry file. None: the registry is not a
    local file (a database URL), and replicas are coordinated by the database itself."""
    from ..db import parse_url

    u = parse_url(cfg.db_path)
    if u.backend != "sqlite":
        return None
    return f"{u.target}.serve.lock"


@click.command()
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="serve Prometheus metrics on this port ([metrics] host, loopback by default; off unless set)")
@click.option("--replica", default=None, metavar="NAME",
              help="run as replica NAME beside other `serve` on the same registry (config controller.replica; "
                   "MQTT 5 shared subscriptions, leases: docs/scale.md)")
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
    replica = cfg.controller.replica or None
    _check_signing_key(cfg.security.signing_key)
    setup_logging(log_level)
    lock = None
    where = instance_lock_path(cfg)
    if where and not replica:
        lock = InstanceLock(where, f"registry {cfg.db_path}")
        try:
            lock.acquire()
        except LockHeld as exc:
            click.echo(f"error: {exc}: another `fleetctl serve` runs on this registry (stop it, or pass "
                       "--replica NAME to run a deliberate second replica)", err=True)
            sys.exit(EX_CONFIG)
        except OSError as exc:
            click.echo(f"error: registry {cfg.db_path}: cannot create its lock {where}: {exc.strerror or exc}", err=True)
            sys.exit(EX_CONFIG)
    try:
        code = asyncio.run(run_until_stopped(lambda stop: _serve(cfg, stop, metrics_port), logger=log))
    finally:
        if lock is not None:
            lock.release()
    if code:
        sys.exit(code)


def _check_signing_key(path: str | None) -> None:
    """A missing or unreadable key: one line naming the file and what to run, exit EX_CONFIG (before
    any logging or connection: under systemd it is the whole journal entry, and no restart loop)."""
    from ..channel import load_signing_key

    try:
        load_signing_key(path)
    except ConfigError as exc:
        click.echo(f"fleetctl serve: {exc}; make a key pair with `fleetctl keys init --dir DIR` and pass "
                   f"--signing-key DIR/controller.pem (or set [security] signing_key)", err=True)
        sys.exit(EX_CONFIG)


async def _serve(cfg: ControllerConfig, stop: asyncio.Event, metrics_port: int | None = None) -> int:
    from ..registry import RegistryError
    from ..service import ControllerService, ReplicaRefused

    try:
        svc = ControllerService(cfg, metrics_port=metrics_port)
        from ..db import parse_url

        log.info("registry %s, broker %s", parse_url(cfg.db_path).display(), cfg.mqtt.broker)
        await svc.run(stop)
    except ConfigError as exc:
        log.error("config error: %s", exc)
        return EX_CONFIG
    except ReplicaRefused:
        return EX_CONFIG     # logged with its reason by the service
    except OSError as exc:   # e.g. the metrics port is taken
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    except RegistryError as exc:   # e.g. the PostgreSQL server is not reachable at start
        log.error("registry: %s", exc)
        return EX_CONFIG
    return 0
