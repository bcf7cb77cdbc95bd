"""Key and certificate files: written whole by atomic rename, keys 0600 from the first byte."""
from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.atomicfile import sync_dir, write_atomic  # noqa: F401 - used by claim/rotation
from protocol.claims import public_der


def load_cert(path: str | Path) -> x509.Certificate | None:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except (OSError, ValueError):
        return None


def load_key(path: str | Path):
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError):
        return None


def pair_matches(cert_path: str | Path, key_path: str | Path) -> bool:
    cert, key = load_cert(cert_path), load_key(key_path)
    return bool(cert and key and public_der(cert.public_key()) == public_der(key.public_key()))
