"""Key and certificate files: written whole by atomic rename, keys 0600 from the first byte."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from protocol.claims import public_der


def write_atomic(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    sync_dir(path.parent)


def sync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
