"""``edge-agent`` command line: thin over config + the daemon (agent.app).

Options may also come from the environment: ``EDGE_AGENT_RUN_CONFIG`` etc.
(click's ``auto_envvar_prefix``).
"""
from __future__ import annotations

import asyncio
import logging
import sys

import click

from . import __version__
from .core.config import AgentConfig, ConfigError, load_config

#: sysexits.h EX_CONFIG: the unit's RestartPreventExitStatus=78, so a bad config fails once, loudly,
#: instead of restart-looping under systemd
EX_CONFIG = 78


def setup_logging(level: str, json_logs: bool = False) -> None:
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, stream=sys.stderr)
    logging.getLogger("paho").setLevel(logging.WARNING)


def _overrides(broker: str | None, device_id: str | None) -> dict:
    o: dict = {}
    if broker:
        o.setdefault("mqtt", {})["broker"] = broker
    if device_id:
        o.setdefault("device", {})["id"] = device_id
    return o


@click.group(context_settings={"auto_envvar_prefix": "EDGE_AGENT", "help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edge-agent")
def cli() -> None:
    """edgefleet's board daemon."""


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="agent TOML config")
@click.option("--broker", default=None, help="override mqtt.broker (mqtt://host:port)")
@click.option("--device-id", default=None, help="override device.id")
@click.option("--connect", is_flag=True, help="also connect to the broker once (as this device) and say why not")
def check(config_path: str, broker: str | None, device_id: str | None, connect: bool) -> None:
    """Check a config and what `run` will open (files, keys, certificates, bundle); exit 2 with one
    line per problem, naming the file."""
    from .core.preflight import check_files

    try:
        cfg = load_config(config_path, _overrides(broker, device_id))
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(2)
    findings = check_files(cfg)
    for f in findings:
        click.echo(f"{'error' if f.problem else 'warning'}: {f.text}", err=True)
    problems = sum(f.problem for f in findings)
    if not problems and connect:
        reason = asyncio.run(_try_broker(cfg))
        if reason:
            click.echo(f"error: broker {cfg.mqtt.broker}: {reason}", err=True)
            problems += 1
        else:
            click.echo(f"broker {cfg.mqtt.broker}: connected as {cfg.device.id}")
    if problems:
        click.echo(f"{config_path}: {problems} problem(s)", err=True)
        sys.exit(2)
    click.echo(f"config OK: device {cfg.device.id} → {cfg.mqtt.broker}")


async def _try_broker(cfg: AgentConfig) -> str | None:
    from protocol.mqttlink import MqttLink, try_connect

    try:
        link = MqttLink.from_settings(cfg.mqtt, cfg.device.id)
        return await try_connect(link, timeout=15)
    except ConfigError as exc:
        return str(exc)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="agent TOML config")
@click.option("--broker", default=None, help="override mqtt.broker (mqtt://host:port)")
@click.option("--device-id", default=None, help="override device.id")
@click.option("--log-level", default="info", type=click.Choice(["debug", "info", "warning", "error"]))
def run(config_path: str, broker: str | None, device_id: str | None, log_level: str) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    try:
        cfg = load_config(config_path, _overrides(broker, device_id))
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(EX_CONFIG)
    setup_logging(log_level)
    from protocol.instancelock import InstanceLock, LockHeld

    # one agent per state dir: a second one would fight the first for its files and its broker id
    lock = InstanceLock(f"{cfg.state.dir}/agent.lock", f"state dir {cfg.state.dir} (device {cfg.device.id})")
    try:
        lock.acquire()
    except LockHeld as exc:
        click.echo(f"error: {exc}; another edge-agent runs with this config", err=True)
        sys.exit(EX_CONFIG)
    except OSError as exc:
        click.echo(f"config error: state.dir {cfg.state.dir}: {exc.strerror or exc}", err=True)
        sys.exit(EX_CONFIG)
    try:
        sys.exit(asyncio.run(_serve(cfg)))
    finally:
        lock.release()


async def _serve(cfg: AgentConfig) -> int:
    from protocol.lifecycle import run_until_stopped

    from .app import Agent  # imported here so `check` stays light
    from .core.sdnotify import Notifier, watchdog_interval
    from .core.watchdog import LoopWatchdog

    log = logging.getLogger("edge_agent")
    notifier = Notifier()
    wd_interval = watchdog_interval()
    watchdog = LoopWatchdog(notifier, wd_interval) if wd_interval else None
    beat = asyncio.create_task(watchdog.heartbeat(), name="watchdog-heartbeat") if watchdog else None
    if watchdog:
        watchdog.start()

    is_ready = asyncio.Event()

    def ready() -> None:   # the agent calls it once connected: READY means "serving", not "started"
        is_ready.set()
        notifier.ready(f"serving as {cfg.device.id} via {cfg.mqtt.broker}")

    async def extend_start() -> None:
        # until the first connection systemd sees "activating" with STATUS "connecting to ... (reason)";
        # extending the start timeout keeps it from killing an agent that waits for its broker
        while not is_ready.is_set():
            notifier.notify("EXTEND_TIMEOUT_USEC=60000000")
            try:
                await asyncio.wait_for(is_ready.wait(), 30)
            except asyncio.TimeoutError:
                pass

    async def main(stop: asyncio.Event) -> int:
        from .provisioning.claim import ClaimRefused, claim_identity, needs_claim

        if needs_claim(cfg):
            notifier.status("claiming an identity with the claim credential")
            claim = asyncio.ensure_future(claim_identity(cfg))
            await asyncio.wait([claim, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
            if not claim.done():
                claim.cancel()
                return 0
            try:
                claim.result()
            except ClaimRefused as exc:
                log.error("%s", exc)
                return 3
        if cfg.relay.enabled:   # the site gateway's role (agent/relay): no board features
            from .relay.service import RelayService

            notifier.status(f"relay for site {cfg.device.site}: connecting to {cfg.mqtt.broker}")
            await RelayService(cfg).run(stop, ready=ready)
            return 0
        agent = Agent(cfg)
        agent.notifier = notifier
        notifier.status(f"connecting to {cfg.mqtt.broker}")
        await agent.run(stop, ready=ready)
        return 0

    extender = asyncio.create_task(extend_start(), name="sd-extend-start")
    try:
        return await run_until_stopped(main, logger=log)
    except ConfigError as exc:  # e.g. an unreadable password or key file, found at connect time
        log.error("config error: %s", exc)
        notifier.status(f"config error: {exc}")
        return EX_CONFIG
    finally:
        extender.cancel()
        notifier.stopping()
        if watchdog:
            watchdog.stop()
        if beat:
            beat.cancel()


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="agent TOML config")
@click.option("--timeout", default=0.0, type=float, help="give up after this many seconds (0: wait for ever)")
def claim(config_path: str, timeout: float) -> None:
    """Claim this board's own certificate with the claim credential ([provisioning]), then exit
    (``run`` does the same on its first start)."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"config error: {exc}", err=True)
        sys.exit(2)
    from .provisioning.claim import ClaimRefused, claim_identity, needs_claim

    setup_logging("info")
    if not needs_claim(cfg):
        click.echo(f"nothing to claim: {cfg.mqtt.cert_file or '[mqtt] cert_file'} exists or [provisioning] "
                   "claim_cert is not set")
        return
    try:
        path = asyncio.run(claim_identity(cfg, timeout or None))
    except ClaimRefused as exc:
        click.echo(str(exc), err=True)
        sys.exit(3)
    except asyncio.TimeoutError:
        click.echo(f"no answer within {timeout:g}s; the claim stays pending (run again to keep waiting)", err=True)
        sys.exit(4)
    click.echo(f"claimed: {path}")


@cli.command()
@click.option("--port", required=True, help="serial port of the MCU, e.g. /dev/ttyUSB0")
@click.option("--baud", default=115200, show_default=True, type=click.IntRange(300, 12_000_000))
@click.option("--bundle", default=None, type=click.Path(file_okay=False), help="answer sensor frames with this model")
@click.option("--push", "push_file", default=None, type=click.Path(dir_okay=False),
              help="push this file (e.g. a .tflite) to the MCU, print the result, exit 0/1")
@click.option("--seconds", default=0.0, type=float, help="stop after this long (0: until SIGINT/SIGTERM)")
def bridge(port: str, baud: int, bundle: str | None, push_file: str | None, seconds: float) -> None:
    """Run the firmware bridge alone (no MQTT): MCU events and stats as JSON lines on stdout."""
    from .mcu.standalone import run_standalone

    setup_logging("warning")
    sys.exit(asyncio.run(run_standalone(port, baud, bundle, push_file, seconds)))


def main() -> None:
    cli(prog_name="edge-agent")


if __name__ == "__main__":
    main()
