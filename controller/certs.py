"""A small certificate authority for the broker's mTLS: CA, server and per-device client certs.

EC P-256 keys (what Mosquitto/OpenSSL and every MQTT client accept), SHA-256 signatures.
The client certificate's CN is the device id, so Mosquitto's ``use_identity_as_username``
makes it the username the ACL patterns (``%u``) match. Keys are written 0600 by atomic
rename.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.atomicfile import write_atomic
from protocol.topics import validate_id


class CertError(ValueError):
    pass


def _write(path: Path, data: bytes, mode: int) -> None:
    """A key is never readable by others, not even for a moment (see protocol.atomicfile)."""
    write_atomic(path, data, mode, dir_mode=0o700)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _check_days(days: int) -> None:
    if not isinstance(days, int) or not 1 <= days <= 36500:
        raise CertError(f"validity must be 1..36500 days, got {days!r}")


def init_ca(directory: str | Path, name: str = "edgefleet CA", days: int = 3650, force: bool = False) -> Path:
    """Mint the CA: ``ca.pem`` (share it) and ``ca.key`` (0600; keep it off the broker). Returns ca.pem."""
    _check_days(days)
    d = Path(directory)
    if (d / "ca.key").exists() and not force:
        raise CertError(f"{d / 'ca.key'} exists (use force to replace: every issued cert becomes invalid)")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(_now() - dt.timedelta(minutes=5))
            .not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(d / "ca.key", _key_pem(key), 0o600)
    _write(d / "ca.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return d / "ca.pem"


def _load_ca(d: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), password=None)
        cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    except (OSError, ValueError) as exc:
        raise CertError(f"no usable CA in {d} (run `fleetctl certs init --dir {d}`): {exc}") from None
    return key, cert  # type: ignore[return-value]


def _issue(d: Path, stem: str, cn: str, server: bool, sans: list[x509.GeneralName], days: int) -> Path:
    _check_days(days)
    ca_key, ca_cert = _load_ca(d)
    key = ec.generate_private_key(ec.SECP256R1())
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
         .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                               else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = b.sign(ca_key, hashes.SHA256())
    _write(d / f"{stem}.key", _key_pem(key), 0o600)
    _write(d / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return d / f"{stem}.pem"


def issue_client(directory: str | Path, device_id: str, days: int = 825) -> Path:
    """``{device_id}.pem`` / ``.key`` signed by the CA in ``directory``; CN = device id (raises
    ``protocol.topics.InvalidId`` for an id that would break the ACL). Re-issuing rotates the key."""
    validate_id(device_id, "device id")
    return _issue(Path(directory), device_id, device_id, False, [], days)


DEFAULT_SERVER_HOSTS = ("127.0.0.1", "localhost")
_DNS_RE = re.compile(r"^(?=.{1,253}$)(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
                     r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def issue_server(directory: str | Path, hosts: list[str] | tuple[str, ...] = DEFAULT_SERVER_HOSTS,
                 days: int = 825) -> Path:
    """The broker's ``server.pem`` / ``server.key``: SAN IP for each address, SAN DNS for each name."""
    if not hosts:
        raise CertError("the server certificate needs at least one host name or IP")
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not _DNS_RE.match(h):
                raise CertError(f"{h!r} is neither an IP address nor a DNS name") from None
            sans.append(x509.DNSName(h))
    return _issue(Path(directory), "server", hosts[0], True, sans, days)
