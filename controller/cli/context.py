"""What every ``fleetctl`` command shares: the global options as a ``Ctx`` (config, registry)."""
from __future__ import annotations

import logging
import sys
from typing import Any

import click

from ..config import ConfigError, ControllerConfig, load_config
from ..registry import Registry, RegistryError


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class Ctx:
    """The global options; ``cfg()`` loads the config with them applied on top."""

    def __init__(self, config: str | None, broker: str | None, db: str | None, topic_root: str | None,
                 signing_key: str | None = None) -> None:
        self.config_path, self.broker, self.db, self.topic_root = config, broker, db, topic_root
        self.signing_key = signing_key

    def cfg(self) -> ControllerConfig:
        o: dict[str, dict[str, Any]] = {}
        if self.broker:
            o.setdefault("mqtt", {})["broker"] = self.broker
        if self.topic_root:
            o.setdefault("mqtt", {})["topic_root"] = self.topic_root
        if self.db:
            o.setdefault("registry", {})["url"] = self.db
            o["registry"]["path"] = ""
        if self.signing_key:
            o.setdefault("security", {})["signing_key"] = self.signing_key
        try:
            return load_config(self.config_path, o)
        except ConfigError as exc:
            raise click.UsageError(f"config error: {exc}") from None

    def registry(self) -> Registry:
        try:
            return Registry(self.cfg().db_path, readonly=True)
        except RegistryError as exc:
            raise click.ClickException(str(exc)) from None


pass_ctx = click.make_pass_decorator(Ctx)
