"""The primitives of secure aggregation, all from well-kept libraries (never home-made crypto):

* X25519 key agreement, HKDF-SHA256, AES-GCM and AES-CTR from ``cryptography``;
* Shamir's secret sharing from PyCryptodome (``Crypto.Protocol.SecretSharing.Shamir``, 16-byte
  secrets over GF(2^128); a 32-byte X25519 private key is shared as two 16-byte halves with the
  same indices). PyCryptodome is the ``secagg`` extra and is imported only when shares are made.

Updates travel as fixed-point integers in Z/2^64 (``encode``/``decode``): masks are uniform there,
so a masked vector tells nothing, and the masks of a sum cancel exactly. The scale (2^28 by
default) bounds the rounding error to 2^-29 per coordinate and client; ``encode`` refuses a
value whose sum over a round could wrap (|x| · 2^scale ≥ 2^62 / clients).
"""
from __future__ import annotations

import hashlib
import os
from typing import Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw


def new_keypair() -> tuple[bytes, bytes]:
    """(private, public) X25519 keys as 32 raw bytes each, from OS entropy."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            sk.public_key().public_bytes(RAW, serialization.PublicFormat.Raw))


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(RAW, serialization.PublicFormat.Raw)


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 over X25519(private, peer_public), bound to ``info``."""
    shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Raises ``cryptography.exceptions.InvalidTag`` for a forged or misrouted share."""
    return AESGCM(key).decrypt(blob[:12], blob[12:], aad)


def prg(seed: bytes, n: int) -> np.ndarray:
    """n uniform uint64 words from a 16- or 32-byte seed (AES-CTR keystream, zero IV: one stream per seed)."""
    enc = Cipher(algorithms.AES(seed), modes.CTR(b"\0" * 16)).encryptor()
    return np.frombuffer(enc.update(b"\0" * (8 * n)) + enc.finalize(), dtype="<u8").copy()


def commit(secret: bytes, label: bytes) -> str:
    return hashlib.sha256(label + b"\0" + secret).hexdigest()


# -- Shamir ----------------------------------------------------------------------------------
def _shamir():
    try:
        from Crypto.Protocol.SecretSharing import Shamir
    except ImportError as exc:  # pragma: no cover - the extra is missing
        raise RuntimeError("secure aggregation needs PyCryptodome: pip install 'edgefleet[secagg]'") from exc
    return Shamir


def share(secret: bytes, k: int, n: int) -> list[tuple[int, bytes]]:
    """Shares 1..n of a 16- or 32-byte secret, any k of which rebuild it; a share is (index, 16|32 bytes)."""
    sh = _shamir()
    if len(secret) == 16:
        return sh.split(k, n, secret)
    if len(secret) != 32:
        raise ValueError("a secret is 16 or 32 bytes")
    lo, hi = sh.split(k, n, secret[:16]), sh.split(k, n, secret[16:])
    return [(i, a + b) for (i, a), (_, b) in zip(lo, hi)]


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    sh = _shamir()
    size = len(shares[0][1])
    if size == 16:
        return sh.combine(list(shares))
    return sh.combine([(i, s[:16]) for i, s in shares]) + sh.combine([(i, s[16:]) for i, s in shares])


# -- fixed point in Z/2^64 ---------------------------------------------------------------------
def encode(x: np.ndarray, scale_bits: int, clients: int) -> np.ndarray:
    """float vector → uint64 fixed point (two's complement); refuses values a sum could wrap."""
    x = np.asarray(x, np.float64)
    if not np.all(np.isfinite(x)):
        raise ValueError("NaN or inf in the update")
    limit = 2.0 ** (62 - scale_bits) / max(1, clients)
    if x.size and float(np.max(np.abs(x))) >= limit:
        raise ValueError(f"update value {float(np.max(np.abs(x))):.3g} too large for secure aggregation "
                         f"(|x| < {limit:.3g} with {clients} clients at 2^{scale_bits})")
    return np.round(x * 2.0 ** scale_bits).astype(np.int64).view(np.uint64)


def decode(v: np.ndarray, scale_bits: int) -> np.ndarray:
    return np.asarray(v, np.uint64).view(np.int64).astype(np.float64) / 2.0 ** scale_bits
