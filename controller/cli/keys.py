"""``fleetctl keys``: the controller's Ed25519 key that signs commands and patches."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def keys() -> None:
    """Signing keys (Ed25519): agents trust the public key in their config."""


@keys.command("init")
@click.option("--dir", "directory", default="keys", show_default=True, type=click.Path(file_okay=False),
              help="where to write controller.pem (private, 0600) and controller.pub")
@click.option("--name", default="controller", show_default=True, help="file name stem")
@click.option("--force", is_flag=True, help="overwrite an existing key")
@click.option("--json", "as_json", is_flag=True)
def init(directory: str, name: str, force: bool, as_json: bool) -> None:
    """Make a new signing key pair."""
    from protocol.signing import generate, key_id, save_keypair

    d = Path(directory)
    priv, pub = d / f"{name}.pem", d / f"{name}.pub"
    if priv.exists() and not force:
        raise click.ClickException(f"{priv} exists; use --force to replace it (agents trusting it must be updated)")
    key = generate()
    try:
        save_keypair(key, priv, pub)
    except OSError as exc:
        raise click.ClickException(f"cannot write the key pair into {d}: {exc.strerror or exc}") from None
    if as_json:
        click.echo(json.dumps({"key_id": key_id(key.public_key()), "private": str(priv), "public": str(pub)}))
        return
    click.echo(f"key {key_id(key.public_key())}\n  private {priv} (keep secret; fleetctl --signing-key)\n"
               f"  public  {pub} (agents: [security] trusted_keys)")


@keys.command("show")
@click.argument("path", type=click.Path(dir_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True)
def show(path: str, as_json: bool) -> None:
    """Print the key id of a public or private key file."""
    from protocol.signing import SignatureError, key_id, load_private, load_public

    try:
        k = load_public(path)
    except SignatureError:
        try:
            k = load_private(path).public_key()
        except SignatureError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"path": path, "key_id": key_id(k)}) if as_json else key_id(k))
