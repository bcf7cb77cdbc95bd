"""``fleetctl certs``: mint the broker CA, the broker's server cert and one client cert per device."""
from __future__ import annotations

import click

from .. import audit


@click.group()
def certs() -> None:
    """TLS certificates for the broker (mTLS: the cert's CN is the device id)."""


@certs.command("init")
@click.option("--dir", "directory", default="pki", show_default=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="replace an existing CA (invalidates every issued cert)")
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500), help="validity")
def init(directory: str, force: bool, days: int) -> None:
    """Create the CA (ca.pem, ca.key 0600)."""
    from ..certs import CertError, init_ca

    try:
        click.echo(f"CA: {init_ca(directory, days=days, force=force)}")
        audit.cli_hook("cert.ca_init", directory, days=days, force=force)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None


@certs.command("issue")
@click.argument("device_id")
@click.option("--dir", "directory", default="pki", show_default=True, type=click.Path(file_okay=False))
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500), help="validity")
def issue(device_id: str, directory: str, days: int) -> None:
    """Issue DEVICE_ID.pem / DEVICE_ID.key (client cert, CN = DEVICE_ID); 'controller' for the controller."""
    from protocol.topics import InvalidId

    from ..certs import CertError, issue_client

    try:
        click.echo(f"client cert: {issue_client(directory, device_id, days)}")
        audit.cli_hook("cert.issue", device_id, directory=directory, days=days)
    except InvalidId as exc:
        raise click.BadParameter(str(exc), param_hint="DEVICE_ID") from None
    except CertError as exc:
        raise click.ClickException(str(exc)) from None


@certs.command("server")
@click.option("--dir", "directory", default="pki", show_default=True, type=click.Path(file_okay=False))
@click.option("--host", "hosts", multiple=True,
              help="broker host name or IP (repeatable); default: 127.0.0.1 and localhost")
@click.option("--days", default=825, show_default=True, type=click.IntRange(1, 36500), help="validity")
def server(directory: str, hosts: tuple[str, ...], days: int) -> None:
    """Issue the broker's server.pem / server.key for the given host names / IPs."""
    from ..certs import DEFAULT_SERVER_HOSTS, CertError, issue_server

    try:
        click.echo(f"server cert: {issue_server(directory, list(hosts) or list(DEFAULT_SERVER_HOSTS), days)}")
        audit.cli_hook("cert.server", directory, hosts=list(hosts), days=days)
    except CertError as exc:
        raise click.ClickException(str(exc)) from None
