"""End-to-end authentication of commands: broker access alone must not command the fleet.

The controller signs each command envelope with its Ed25519 key. The signed bytes are
the canonical JSON of the envelope (without ``auth``) *plus the topic it is published
on*, so a command captured for one device cannot be replayed to another, and the
envelope's ``ts`` and ``id`` let the agent refuse replays: ``ts`` must be within
``max_skew_s`` of the agent's clock and an ``id`` is accepted once (bounded memory).
Pure logic; the caller passes ``now``.
"""
from __future__ import annotations

import base64
from collections import OrderedDict
from dataclasses import replace
import json
from typing import Any, Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

import hashlib
from typing import Mapping

import numpy as np

from .binary import Frame, encode_frame, payload_of
from .envelope import Envelope
from .signing import SignatureError, key_id


def signed_bytes(env: Envelope, topic: str) -> bytes:
    d = env.to_dict()
    d.pop("auth", None)
    d["topic"] = topic
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def sign_envelope(env: Envelope, topic: str, key: Ed25519PrivateKey) -> Envelope:
    # the wire form rounds ts; sign exactly what the receiver will rebuild
    env = replace(env, ts=round(env.ts, 6), auth=None)
    sig = key.sign(signed_bytes(env, topic))
    return replace(env, auth={"alg": "ed25519", "key_id": key_id(key.public_key()),
                              "sig": base64.b64encode(sig).decode()})


class CommandVerifier:
    """Verifies signatures, clock skew and replays of inbound commands."""

    def __init__(self, trusted: Iterable[Ed25519PublicKey], max_skew_s: float = 300.0, remember: int = 4096) -> None:
        self.keys = {key_id(k): k for k in trusted}
        self.max_skew_s = max_skew_s
        self.remember = remember
        self._seen: OrderedDict[str, None] = OrderedDict()

    def verify(self, env: Envelope, topic: str, now: float) -> str:
        """Return the signing key id, or raise SignatureError with the reason."""
        auth: Any = env.auth
        if not auth:
            raise SignatureError("unsigned command (this agent requires signed commands)")
        if auth.get("alg") != "ed25519":
            raise SignatureError(f"unsupported signature algorithm {auth.get('alg')!r}")
        key = self.keys.get(auth.get("key_id"))
        if key is None:
            raise SignatureError(f"command signed by key {auth.get('key_id')!r}, which is not trusted here")
        try:
            raw = base64.b64decode(auth.get("sig", ""), validate=True)
            key.verify(raw, signed_bytes(env, topic))
        except (ValueError, TypeError, InvalidSignature):
            raise SignatureError("bad command signature (altered, re-targeted or signed by another key)") from None
        if abs(now - env.ts) > self.max_skew_s:
            raise SignatureError(f"command timestamp is {now - env.ts:+.0f}s off our clock "
                                 f"(limit ±{self.max_skew_s:.0f}s): stale or replayed")
        if env.id in self._seen:
            raise SignatureError(f"replayed command id {env.id}")
        self._seen[env.id] = None
        while len(self._seen) > self.remember:
            self._seen.popitem(last=False)
        return auth["key_id"]


def sign_frame(env: Envelope, topic: str, key: Ed25519PrivateKey | None,
               tensors: Mapping[str, np.ndarray] | None = None, blob: bytes = b"") -> bytes:
    """Encode a binary frame whose signature (when ``key`` is given) also covers its payload."""
    _, payload = payload_of(tensors, blob)
    env = replace(env, body={**env.body, "payload_sha256": hashlib.sha256(payload).hexdigest()})
    if key is not None:
        env = sign_envelope(env, topic, key)
    return encode_frame(env, tensors, blob)


def verify_frame(verifier: "CommandVerifier", frame: Frame, topic: str, now: float) -> str:
    """Verify the envelope's signature and that it names this frame's payload."""
    kid = verifier.verify(frame.envelope, topic, now)
    if frame.envelope.body.get("payload_sha256") != frame.payload_sha256:
        raise SignatureError("signed payload hash does not match the frame's payload")
    return kid
