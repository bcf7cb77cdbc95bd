"""End-to-end authentication of commands: broker access alone must not command the fleet.

The controller signs each command envelope with its Ed25519 key. The signed bytes are
the canonical JSON of the envelope (without ``auth``) *plus the topic it is published
on*, so a command captured for one device cannot be replayed to another, and the
envelope's ``ts`` and ``id`` let the agent refuse replays: ``ts`` must be within
``max_skew_s`` of the agent's clock and an ``id`` is accepted once.

Replays must stay refused across a restart, when the in-memory ids are gone: per signing key
the verifier keeps a *high-water mark* — the newest ``ts`` it accepted and the ids accepted at
exactly that ``ts`` — and hands it to ``persist`` (the agent writes it atomically to its state
dir) *before* a command is accepted. A verifier built from saved ``marks`` refuses anything
signed before the mark (or the mark's own ids): a captured older command, replayed after a
restart, is refused although its signature and timestamp are fine. Within one run, commands
from two publishers sharing a key may cross (fleetctl and the service), so only ids are checked
above the floor the run started with; when the id memory is full the floor rises to the evicted
``ts`` rather than forgetting. Pure logic; the caller passes ``now`` and does the I/O.
"""
from __future__ import annotations

import base64
from collections import OrderedDict
from dataclasses import replace
import json
from typing import Any, Callable, Iterable

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


class ReplayError(SignatureError):
    """A well-signed command seen before, or older than what this board already accepted."""


#: per key id: {"ts": newest accepted ts, "ids": [ids accepted at exactly that ts]} (plain JSON data)
Marks = dict[str, dict[str, Any]]


class CommandVerifier:
    """Verifies signatures, clock skew and replays of inbound commands."""

    def __init__(self, trusted: Iterable[Ed25519PublicKey], max_skew_s: float = 300.0, remember: int = 4096,
                 marks: "Marks | None" = None, persist: "Callable[[Marks], None] | None" = None,
                 floor: float | None = None) -> None:
        """``marks``: what ``persist`` saved last run; ``floor``: refuse anything signed before it for a
        key without a mark (the saved marks were unreadable: fail closed to the start time)."""
        self.keys = {key_id(k): k for k in trusted}
        self.max_skew_s = max_skew_s
        self.remember = remember
        self.persist = persist
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()   # id -> (key id, ts), this run
        self._high: dict[str, tuple[float, frozenset[str]]] = {}          # the high-water mark per key
        self._floor: dict[str, tuple[float, frozenset[str]]] = {}         # refuse at or below (ids at it)
        for kid in self.keys:
            m = (marks or {}).get(kid)
            if m is not None:
                mark = (float(m["ts"]), frozenset(str(i) for i in m.get("ids") or ()))
                self._high[kid] = self._floor[kid] = mark
            elif floor is not None:
                self._floor[kid] = (float(floor), frozenset())

    def marks(self) -> Marks:
        return {kid: {"ts": ts, "ids": sorted(ids)} for kid, (ts, ids) in self._high.items()}

    def verify(self, env: Envelope, topic: str, now: float, durable: bool = True) -> str:
        """Return the signing key id, or raise SignatureError with the reason (ReplayError: a replay).

        ``durable=False``: a message whose replay is harmless (a transfer chunk: hash-checked and
        deduplicated by the receiver) is checked the same way but does not wait on ``persist``;
        the next durable command saves the mark it advanced."""
        auth: Any = env.auth
        if not auth:
            raise SignatureError("unsigned command (this agent requires signed commands)")
        if auth.get("alg") != "ed25519":
            raise SignatureError(f"unsupported signature algorithm {auth.get('alg')!r}")
        kid = auth.get("key_id")
        key = self.keys.get(kid)
        if key is None:
            raise SignatureError(f"command signed by key {kid!r}, which is not trusted here")
        try:
            raw = base64.b64decode(auth.get("sig", ""), validate=True)
            key.verify(raw, signed_bytes(env, topic))
        except (ValueError, TypeError, InvalidSignature):
            raise SignatureError("bad command signature (altered, re-targeted or signed by another key)") from None
        if abs(now - env.ts) > self.max_skew_s:
            raise SignatureError(f"command timestamp is {now - env.ts:+.0f}s off our clock "
                                 f"(limit ±{self.max_skew_s:.0f}s): stale or replayed")
        if env.id in self._seen:
            raise ReplayError(f"replayed command id {env.id}")
        floor, at_floor = self._floor.get(kid, (float("-inf"), frozenset()))
        if env.ts < floor or (env.ts == floor and env.id in at_floor):
            raise ReplayError(f"replayed or out-of-date command {env.id}: signed at {env.ts:.6f}, not after the "
                              f"high-water mark {floor:.6f} of key {kid} (kept across restarts)")
        high = self._high.get(kid)
        new_high = high
        if high is None or env.ts > high[0]:
            new_high = (env.ts, frozenset({env.id}))
        elif env.ts == high[0]:
            new_high = (env.ts, high[1] | {env.id})
        if new_high != high and self.persist is not None and durable:
            marks = self.marks()
            marks[kid] = {"ts": new_high[0], "ids": sorted(new_high[1])}
            try:
                self.persist(marks)
            except OSError as exc:   # not durable: accepting it would let a restart take it again
                raise SignatureError(f"cannot record the command's id for replay protection: "
                                     f"{exc.strerror or exc}") from None
        if new_high is not None:
            self._high[kid] = new_high
        self._seen[env.id] = (kid, env.ts)
        while len(self._seen) > self.remember:
            old_id, (old_kid, old_ts) = self._seen.popitem(last=False)
            f_ts, f_ids = self._floor.get(old_kid, (float("-inf"), frozenset()))
            if old_ts > f_ts:
                self._floor[old_kid] = (old_ts, frozenset({old_id}))
            elif old_ts == f_ts:
                self._floor[old_kid] = (f_ts, f_ids | {old_id})
        return kid


def sign_frame(env: Envelope, topic: str, key: Ed25519PrivateKey | None,
               tensors: Mapping[str, np.ndarray] | None = None, blob: bytes = b"") -> bytes:
    """Encode a binary frame whose signature (when ``key`` is given) also covers its payload."""
    _, payload = payload_of(tensors, blob)
    env = replace(env, body={**env.body, "payload_sha256": hashlib.sha256(payload).hexdigest()})
    if key is not None:
        env = sign_envelope(env, topic, key)
    return encode_frame(env, tensors, blob)


def verify_frame(verifier: "CommandVerifier", frame: Frame, topic: str, now: float, durable: bool = True) -> str:
    """Verify the envelope's signature and that it names this frame's payload."""
    kid = verifier.verify(frame.envelope, topic, now, durable)
    if frame.envelope.body.get("payload_sha256") != frame.payload_sha256:
        raise SignatureError("signed payload hash does not match the frame's payload")
    return kid
