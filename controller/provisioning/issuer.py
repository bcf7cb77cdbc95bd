"""Sign a verified CSR with the fleet CA (controller/certs.py's CA directory).

Lifetimes are in seconds so tests can use certificates that live 20 s; the backdating for
clock skew is a tenth of the lifetime (at most 5 min) so a short certificate's 2/3 point stays
in the future. An expired (or soon expiring) signer is refused, never used.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.claims import ClaimError, Request

from ..certs import _load_ca


@dataclass(frozen=True)
class Issued:
    device_id: str
    cert_pem: str
    serial: str
    not_after: float


def sign_request(ca_dir: str | Path, req: Request, lifetime_s: float, now: float | None = None) -> Issued:
    ca_key, ca_cert = _load_ca(Path(ca_dir))
    t = dt.datetime.now(dt.timezone.utc) if now is None else dt.datetime.fromtimestamp(now, dt.timezone.utc)
    end = t + dt.timedelta(seconds=lifetime_s)
    if ca_cert.not_valid_after_utc <= end or ca_cert.not_valid_before_utc > t:
        raise ClaimError("signer_expired", f"the fleet CA is valid until {ca_cert.not_valid_after_utc:%Y-%m-%d %H:%M}"
                         f" UTC: it cannot sign a certificate valid until {end:%Y-%m-%d %H:%M:%S} UTC")
    csr = req.csr()
    back = dt.timedelta(seconds=min(300.0, lifetime_s / 10))
    serial = x509.random_serial_number()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, req.device_id)]))
            .issuer_name(ca_cert.subject).public_key(csr.public_key()).serial_number(serial)
            .not_valid_before(t - back).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Issued(req.device_id, cert.public_bytes(serialization.Encoding.PEM).decode(), f"{serial:x}",
                  end.timestamp())
