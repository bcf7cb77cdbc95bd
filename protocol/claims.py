"""Signed claims and renewals: a board asks for a certificate for a key it just made.

Pure: no sockets, no files. One message shape serves both the first claim (sent with the
fleet-wide claim credential on ``{root}/v1/claim/req``) and a renewal (sent with the board's own
certificate on ``{root}/v1/dev/{id}/data/cert``)::

    {"schema": "edgefleet.claim/1", "purpose": "claim" | "renew", "device_id": ..., "nonce": 32 hex,
     "ts": unix seconds, "hardware": {...}, "tags": [...], "csr": PEM, "sig": base64}

``sig`` is ECDSA-SHA256 by the *new* key over the canonical JSON of everything else, and the CSR
is self-signed by the same key: the verifier checks both and that they name the same public key
(a CSR for someone else's key, or a body changed in flight, is refused). Replays are refused by
the store (a nonce is used once) and by the skew window on ``ts``. The answer goes to
``{root}/v1/claim/answer/{nonce}``: it carries only the certificate (public), which is useless
without the private key that never left the board.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
import json
import os
import re
import time
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .topics import InvalidId, Topics, validate_id

SCHEMA = "edgefleet.claim/1"
MAX_CLAIM_BYTES = 16 * 1024
DEFAULT_SKEW_S = 300.0
_NONCE_RE = re.compile(r"^[0-9a-f]{32}$")
PURPOSES = ("claim", "renew")


class ClaimError(ValueError):
    """A refused claim/renewal; ``reason`` is the stable code sent back and counted."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def claim_request_topic(topics: Topics) -> str:
    return f"{topics.base}/claim/req"


def claim_answer_topic(topics: Topics, nonce: str) -> str:
    if not _NONCE_RE.match(nonce or ""):
        raise ClaimError("bad_nonce", f"nonce {nonce!r} is not 32 lowercase hex digits")
    return f"{topics.base}/claim/answer/{nonce}"


def renew_topic(topics: Topics, device_id: str) -> str:
    return topics.data(device_id, "cert")


def canonical(body: dict[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in body.items() if k != "sig"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True).encode()


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_der(key: Any) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def make_request(key: ec.EllipticCurvePrivateKey, device_id: str, purpose: str = "claim", *,
                 hardware: dict[str, Any] | None = None, tags: list[str] | tuple[str, ...] = (),
                 nonce: str | None = None, ts: float | None = None) -> dict[str, Any]:
    """A signed claim/renewal body for ``key`` (the fresh key; its CSR names ``device_id``)."""
    validate_id(device_id)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
           .sign(key, hashes.SHA256()))
    body: dict[str, Any] = {"schema": SCHEMA, "purpose": purpose, "device_id": device_id,
                            "nonce": nonce or os.urandom(16).hex(), "ts": round(time.time() if ts is None else ts, 3),
                            "hardware": dict(hardware or {}), "tags": list(tags),
                            "csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    body["sig"] = base64.b64encode(key.sign(canonical(body), ec.ECDSA(hashes.SHA256()))).decode()
    return body


@dataclass(frozen=True)
class Request:
    """A verified claim/renewal."""
    purpose: str
    device_id: str
    nonce: str
    ts: float
    csr_pem: str
    hardware: dict[str, Any] = field(default_factory=dict)
    tags: tuple[str, ...] = ()

    def csr(self) -> x509.CertificateSigningRequest:
        return x509.load_pem_x509_csr(self.csr_pem.encode())


def parse_request(payload: bytes, now: float, *, purpose: str, max_bytes: int = MAX_CLAIM_BYTES,
                  skew_s: float = DEFAULT_SKEW_S, expect_device: str | None = None) -> Request:
    """Verify one request; raises ClaimError(reason) naming what is wrong."""
    if len(payload) > max_bytes:
        raise ClaimError("oversize", f"{len(payload)} bytes is over the {max_bytes}-byte limit")
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ClaimError("bad_json", f"not JSON: {exc}") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise ClaimError("bad_schema", f"not an {SCHEMA} object")
    if body.get("purpose") != purpose:
        raise ClaimError("bad_purpose", f"purpose {body.get('purpose')!r} is not {purpose!r} on this topic")
    try:
        device_id = validate_id(body.get("device_id"))
    except InvalidId as exc:
        raise ClaimError("bad_device_id", str(exc)) from None
    if expect_device is not None and device_id != expect_device:
        raise ClaimError("id_mismatch", f"request names {device_id!r} but came from {expect_device!r}")
    nonce = body.get("nonce")
    if not isinstance(nonce, str) or not _NONCE_RE.match(nonce):
        raise ClaimError("bad_nonce", "nonce must be 32 lowercase hex digits")
    ts = body.get("ts")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool):
        raise ClaimError("bad_ts", "ts must be a number")
    if abs(now - ts) > skew_s:
        raise ClaimError("stale", f"ts is {now - ts:+.0f}s from now (window ±{skew_s:g}s): replayed or clock wrong")
    hardware, tags = body.get("hardware") or {}, body.get("tags") or []
    if not isinstance(hardware, dict) or not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ClaimError("bad_format", "hardware must be an object and tags a list of strings")
    try:
        csr = x509.load_pem_x509_csr(str(body.get("csr", "")).encode())
    except ValueError as exc:
        raise ClaimError("bad_csr", f"CSR does not parse: {exc}") from None
    if not csr.is_signature_valid:
        raise ClaimError("bad_csr", "the CSR's self-signature does not verify")
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != device_id:
        raise ClaimError("id_mismatch", f"the CSR's CN is not {device_id!r}")
    pub = csr.public_key()
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
        raise ClaimError("bad_key", "the key must be EC P-256")
    try:
        sig = base64.b64decode(str(body.get("sig", "")), validate=True)
        pub.verify(sig, canonical(body), ec.ECDSA(hashes.SHA256()))
    except (ValueError, InvalidSignature):
        raise ClaimError("bad_signature", "the signature does not verify with the CSR's public key "
                         "(forged, altered, or a CSR for another key)") from None
    return Request(purpose, device_id, nonce, float(ts), str(body["csr"]), hardware, tuple(tags))


def answer(nonce: str, ok: bool, *, cert_pem: str = "", reason: str = "", error: str = "") -> bytes:
    body: dict[str, Any] = {"schema": SCHEMA, "nonce": nonce, "ok": ok}
    if ok:
        body["cert"] = cert_pem
    else:
        body.update(reason=reason, error=error)
    return json.dumps(body).encode()


def check_issued(cert_pem: str, key: ec.EllipticCurvePrivateKey, ca_pem: bytes, device_id: str,
                 now: float | None = None) -> x509.Certificate:
    """The board's check of what came back: our key, our id, signed by our CA, valid now."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem.encode())
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise ClaimError("bad_cert", f"certificate does not parse: {exc}") from None
    if public_der(cert.public_key()) != public_der(key.public_key()):
        raise ClaimError("key_mismatch", "the certificate is not for our key")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns or cns[0].value != device_id:
        raise ClaimError("id_mismatch", f"the certificate is not for {device_id!r}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise ClaimError("untrusted", "the certificate is not signed by our CA") from None
    t = time.time() if now is None else now
    if not cert.not_valid_before_utc.timestamp() - 60 <= t < cert.not_valid_after_utc.timestamp():
        raise ClaimError("expired", "the certificate is not valid now")
    return cert
