"""Ed25519 signatures over canonical JSON (patch manifests, bundle manifests).

The signed bytes are the manifest without its ``signature`` field, serialised with
sorted keys and no whitespace, so signer and verifier agree byte for byte whatever
JSON library wrote the file. Keys are raw 32-byte Ed25519 keys stored as PEM
(PKCS#8 / SubjectPublicKeyInfo) so ``openssl`` can read them too.
"""
from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from .atomicfile import write_atomic

SIG_FIELD = "signature"


class SignatureError(ValueError):
    """Missing, malformed or wrong signature, or an untrusted key."""


def canonical(obj: Mapping[str, Any]) -> bytes:
    body = {k: v for k, v in obj.items() if k != SIG_FIELD}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def key_id(pub: Ed25519PublicKey) -> str:
    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_keypair(key: Ed25519PrivateKey, private_path: str | Path, public_path: str | Path) -> None:
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomic(private_path, priv, 0o600)
    write_atomic(public_path, pub, 0o644)


def load_private(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot load private key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public(path: str | Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"cannot load public key {path}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign(obj: Mapping[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """Return a copy of ``obj`` with ``signature = {"alg", "key_id", "sig"}``."""
    sig = key.sign(canonical(obj))
    out = {k: v for k, v in obj.items() if k != SIG_FIELD}
    out[SIG_FIELD] = {"alg": "ed25519", "key_id": key_id(key.public_key()),
                      "sig": base64.b64encode(sig).decode()}
    return out


def verify(obj: Mapping[str, Any], trusted: Iterable[Ed25519PublicKey]) -> str:
    """Check ``obj``'s signature against the trusted keys; return the key id that signed it."""
    sig = obj.get(SIG_FIELD)
    if not isinstance(sig, dict):
        raise SignatureError("unsigned: no signature field")
    if sig.get("alg") != "ed25519":
        raise SignatureError(f"unsupported signature algorithm {sig.get('alg')!r}")
    try:
        raw = base64.b64decode(sig.get("sig", ""), validate=True)
    except (ValueError, TypeError):
        raise SignatureError("signature is not valid base64") from None
    if len(raw) != 64:
        raise SignatureError(f"signature must be 64 bytes, got {len(raw)}")
    keys = {key_id(k): k for k in trusted}
    kid = sig.get("key_id")
    if kid not in keys:
        raise SignatureError(f"signed by key {kid!r}, which is not trusted here")
    try:
        keys[kid].verify(raw, canonical(obj))
    except InvalidSignature:
        raise SignatureError(f"bad signature (key {kid}): content was altered or signed by another key") from None
    return kid
