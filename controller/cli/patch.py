"""``fleetctl patch …``: make and inspect signed model patches."""
from __future__ import annotations

import json
from pathlib import Path

import click

from protocol.atomicfile import write_atomic

from .. import audit


@click.group()
def patch() -> None:
    """Signed model patches (only what changed between two bundle versions)."""


@patch.command("make")
@click.argument("old_bundle", type=click.Path(file_okay=False))
@click.argument("new_bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--key", "key_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="controller Ed25519 private key (fleetctl keys init)")
@click.option("--full", is_flag=True, help="a full bundle (patch against nothing); OLD_BUNDLE is ignored")
@click.option("--json", "as_json", is_flag=True)
def make(old_bundle: str, new_bundle: str, out: str, key_path: str, full: bool, as_json: bool) -> None:
    """Write a patch taking OLD_BUNDLE to NEW_BUNDLE into OUT."""
    from protocol.patch import PatchError, make_patch
    from protocol.signing import SignatureError, load_private

    parent = Path(out).resolve().parent
    if not parent.is_dir():
        # not created for you: a typo in a path should not leave directories behind
        raise click.BadParameter(f"directory {parent} does not exist (create it first)", param_hint="OUT")
    try:
        key = load_private(key_path)
        data, pm = make_patch(None if full else old_bundle, new_bundle, key)
    except (PatchError, SignatureError) as exc:
        raise click.ClickException(str(exc)) from None
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc.filename}: no such file") from None
    try:
        write_atomic(out, data)
    except OSError as exc:
        raise click.ClickException(f"cannot write {out}: {exc.strerror or exc}") from None
    audit.cli_hook("patch.make", pm["target"]["version"], key_id=pm["signature"]["key_id"], out=out)
    summary = {"out": out, "bytes": len(data), "base": pm["base"], "target": pm["target"],
               "files": sorted(pm["files"]), "unchanged": pm["unchanged"], "key_id": pm["signature"]["key_id"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        base = pm["base"]["version"] if pm["base"] else "nothing"
        click.echo(f"{out}: {base} → {pm['target']['version']}, {len(data)} bytes, "
                   f"ships {', '.join(summary['files'])}; unchanged {', '.join(pm['unchanged']) or '-'}")


@patch.command("inspect")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(path: str, as_json: bool) -> None:
    """Show a patch's manifest (not verified: agents verify with their trusted keys)."""
    from protocol.patch import PatchError, parse_patch

    try:
        pm, payload = parse_patch(Path(path).read_bytes())
    except PatchError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(pm, indent=2))
        return
    base = pm.get("base") or {}
    click.echo(f"{pm.get('name')}: {base.get('version', 'nothing')} → {pm['target']['version']}  "
               f"signed by {pm.get('signature', {}).get('key_id')}")
    for n, f in sorted(pm.get("files", {}).items()):
        click.echo(f"  {n:<24} {f['size']:>10} B  {f['sha256'][:16]}")
    click.echo(f"  payload {len(payload)} B zstd ({pm['payload']['raw_size']} B raw)")
