"""``fleetctl model lineage VERSION|BUNDLE_DIR``: walk a version back to its origin.

Each step reads a bundle's manifest ``lineage`` (protocol/lineage.py) and follows its
``parent_version`` through the controller's artifact store (every version a rollout or a
federated run made is there), until a version with no parent or one the store does not hold.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from protocol.lineage import LineageError, of_manifest, summary

from .context import Ctx, pass_ctx


def _manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: cannot read manifest.json: {exc}") from None


def walk(start: dict[str, Any], find: Any, max_depth: int = 1000) -> list[dict[str, Any]]:
    """The chain from ``start`` (a manifest) to its root; ``find(version)`` → manifest or None."""
    chain, seen, m = [], set(), start
    while m is not None and len(chain) < max_depth:
        try:
            lin = of_manifest(m)
        except LineageError as exc:
            lin, err = None, str(exc)
        else:
            err = None
        step = {"version": m.get("version"), "name": m.get("name"), "lineage": lin, "summary": summary(lin)}
        if err:
            step["error"] = err
        chain.append(step)
        parent = (lin or {}).get("parent_version") or m.get("parent_version")
        if not parent or parent in seen:
            break
        seen.add(m.get("version"))
        m = find(parent)
        if m is None:
            chain.append({"version": parent, "name": None, "lineage": None,
                          "summary": "not in the artifact store (made elsewhere, or pruned)"})
    return chain


@click.command("lineage")
@click.argument("version")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def lineage(c: Ctx, version: str, as_json: bool) -> None:
    """Where VERSION (or the bundle directory VERSION) came from, back to its origin."""
    from ..rollouts.store import RolloutStore

    store = None
    db = c.cfg().db_path
    if not c.cfg().db_is_sqlite or os.path.exists(db):
        store = RolloutStore.reader(c.registry().db)

    def find(v: str) -> dict[str, Any] | None:
        a = store.artifact_by_version(v) if store else None
        if a is None or a.kind != "bundle" or not Path(a.path).is_dir():
            return None
        return _manifest(Path(a.path))

    start = _manifest(Path(version)) if Path(version).is_dir() else find(version)
    if start is None:
        raise click.ClickException(f"version {version!r} is not in the artifact store at {db} (give a bundle dir?)")
    chain = walk(start, find)
    if as_json:
        click.echo(json.dumps({"chain": chain}, indent=2))
        return
    for i, step in enumerate(chain):
        click.echo(f"{'  ' * i}{'└─ ' if i else ''}{step['version']}: {step['summary']}"
                   + (f"  [invalid lineage: {step['error']}]" if step.get("error") else ""))
