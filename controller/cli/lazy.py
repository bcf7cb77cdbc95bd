"""Commands loaded when they run (click's LazyGroup pattern): ``fleetctl devices --json`` imports
the registry and the devices module, not paho, numpy or ONNX for commands it never calls.

Each entry names a loader (``module:function`` returning the command, or ``module:attribute``)
and the one-line summary ``fleetctl --help`` shows, so listing the commands loads none of them;
tests/controller/test_cli_lazy.py holds every summary to the real command's.
"""
from __future__ import annotations

from dataclasses import dataclass
import importlib
from typing import Any

import click


@dataclass(frozen=True)
class Lazy:
    target: str      # "package.module:name": a click command, or a function returning one
    summary: str     # what `fleetctl --help` lists for it


class LazyGroup(click.Group):
    """A group whose ``lazy`` subcommands are imported the first time they are asked for."""

    def __init__(self, *args: Any, lazy: dict[str, Lazy] | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lazy: dict[str, Lazy] = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            self.add_command(self.load(cmd_name), cmd_name)
        return super().get_command(ctx, cmd_name)

    def load(self, name: str) -> click.Command:
        modname, attr = self.lazy[name].target.split(":")
        obj = getattr(importlib.import_module(modname), attr)
        cmd = obj if isinstance(obj, click.Command) else obj()
        if not isinstance(cmd, click.Command):
            raise TypeError(f"{self.lazy[name].target} did not give a click command")
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """Like click's, with the summaries of commands not loaded yet taken from the table."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.commands.get(name) or click.Command(name, help=self.lazy[name].summary)
            if not cmd.hidden:
                rows.append((name, cmd))
        if rows:
            limit = formatter.width - 6 - max(len(n) for n, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(n, c.get_short_help_str(limit)) for n, c in rows])
