"""The message envelope every JSON message carries, and its validating codec.

Wire form (UTF-8 JSON object, plain enough for Home Assistant / Node-RED templates)::

    {"schema": 1, "kind": "telemetry", "id": "3f9c...", "sender": "pi-07",
     "ts": 1763827200.123, "body": {...},
     "reply_to": "edgefleet/v1/dev/pi-07/reply/cli-1", "corr": "a1b2"}   # requests only

``decode`` never returns a half-valid message: it raises ``DecodeError`` naming the
field and what was wrong. Callers at the MQTT edge catch it, log it, count it by
``reason`` and keep going (the peer's bad input is data, not a crash).
"""
from __future__ import annotations

from dataclasses import dataclass, field
import json
import math
import os
import time
from typing import Any, Callable, Mapping

from .topics import SCHEMA_VERSION, InvalidId, validate_id

MAX_JSON_BYTES = 256 * 1024
_ID_MAX = 64


class DecodeError(ValueError):
    """The peer sent something we will not accept.

    ``reason`` is a short stable slug for counters (``bad_json``, ``schema``,
    ``unknown_kind``, ``oversize``, ``field``, ``sender_mismatch``...);
    ``field`` names the offending field when there is one.
    """

    def __init__(self, reason: str, message: str, field: str | None = None) -> None:
        super().__init__(f"{reason}: {message}" + (f" (field {field!r})" if field else ""))
        self.reason = reason
        self.field = field
        self.detail = message


def new_id() -> str:
    """128-bit random message id, hex (no uuid import on the hot path)."""
    return os.urandom(16).hex()


@dataclass(frozen=True)
class Envelope:
    kind: str
    sender: str
    body: Mapping[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=new_id)
    ts: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION
    reply_to: str | None = None
    corr: str | None = None
    auth: Mapping[str, Any] | None = None  # end-to-end signature (protocol.cmdauth)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"schema": self.schema, "kind": self.kind, "id": self.id,
                             "sender": self.sender, "ts": round(self.ts, 6), "body": dict(self.body)}
        if self.reply_to is not None:
            d["reply_to"] = self.reply_to
        if self.corr is not None:
            d["corr"] = self.corr
        if self.auth is not None:
            d["auth"] = dict(self.auth)
        return d

    def reply(self, sender: str, kind: str, body: Mapping[str, Any]) -> "Envelope":
        """Build the reply to this request (correlation id = request's corr or id)."""
        return Envelope(kind=kind, sender=sender, body=body, corr=self.corr or self.id)


def encode(env: Envelope) -> bytes:
    """Envelope → compact JSON bytes. Raises ValueError on non-finite floats (our bug)."""
    return json.dumps(env.to_dict(), separators=(",", ":"), allow_nan=False).encode()


# ---------------------------------------------------------------------------
# Body validators: one small function per kind. They raise DecodeError("field", ...).

BodyCheck = Callable[[Mapping[str, Any]], None]


def _req(body: Mapping[str, Any], name: str, types: type | tuple[type, ...], optional: bool = False) -> Any:
    if name not in body:
        if optional:
            return None
        raise DecodeError("field", "missing", f"body.{name}")
    val = body[name]
    if optional and val is None:
        return None
    if isinstance(val, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise DecodeError("field", f"expected {_tname(types)}, got bool", f"body.{name}")
    if not isinstance(val, types):
        raise DecodeError("field", f"expected {_tname(types)}, got {type(val).__name__}", f"body.{name}")
    if isinstance(val, float) and not math.isfinite(val):
        raise DecodeError("field", "not a finite number", f"body.{name}")
    return val


def _tname(types: type | tuple[type, ...]) -> str:
    if isinstance(types, tuple):
        return " or ".join(t.__name__ for t in types)
    return types.__name__


def _check_state(body: Mapping[str, Any]) -> None:
    status = _req(body, "status", str)
    if status not in ("online", "offline"):
        raise DecodeError("field", f"must be 'online' or 'offline', got {status!r}", "body.status")
    _req(body, "versions", dict, optional=True)
    _req(body, "capabilities", dict, optional=True)


def _check_telemetry(body: Mapping[str, Any]) -> None:
    _req(body, "seq", int)
    _req(body, "interval_s", (int, float))
    for name in ("cpu_percent", "rss_mb", "uptime_s"):
        _req(body, name, (int, float), optional=True)


def _check_event(body: Mapping[str, Any]) -> None:
    _req(body, "event", str)
    level = _req(body, "level", str, optional=True)
    if level is not None and level not in ("debug", "info", "warning", "error"):
        raise DecodeError("field", f"unknown level {level!r}", "body.level")


def _check_cmd(body: Mapping[str, Any]) -> None:
    _req(body, "command", str)
    _req(body, "args", dict, optional=True)


def _check_reply(body: Mapping[str, Any]) -> None:
    _req(body, "ok", bool)
    if body["ok"] is False:
        _req(body, "error", str)


def _check_infer_request(body: Mapping[str, Any]) -> None:
    """JSON requests carry ``x`` (the one input) or ``inputs`` ({name: list}); a binary frame
    carries its inputs as tensors and may have neither (the agent replies ``missing_input``)."""
    x = _req(body, "x", list, optional=True)
    if x is not None and not x:
        raise DecodeError("field", "empty input", "body.x")
    inputs = _req(body, "inputs", dict, optional=True)
    if inputs is not None and (not inputs or not all(isinstance(v, list) and v for v in inputs.values())):
        raise DecodeError("field", "must map input names to non-empty lists", "body.inputs")
    _req(body, "label", int, optional=True)
    _req(body, "deadline_ms", (int, float), optional=True)


def _check_result(body: Mapping[str, Any]) -> None:
    t = _req(body, "type", str)
    if t not in ("result", "summary"):
        raise DecodeError("field", f"must be 'result' or 'summary', got {t!r}", "body.type")


def _check_feedback(body: Mapping[str, Any]) -> None:
    rid = _req(body, "request_id", str)
    if not (0 < len(rid) <= 64):
        raise DecodeError("field", "must be 1-64 chars", "body.request_id")
    _req(body, "label", int)


def _check_any(body: Mapping[str, Any]) -> None:
    return None


#: kind → body validator. Unknown kinds are rejected (``unknown_kind``), so a typo is loud.
KINDS: dict[str, BodyCheck] = {
    "state": _check_state,
    "telemetry": _check_telemetry,
    "event": _check_event,
    "cmd": _check_cmd,
    "reply": _check_reply,
    "infer.request": _check_infer_request,
    "ctl.state": _check_any,
    "ctl.telemetry": _check_any,
    "result": _check_result,
    "feedback": _check_feedback,
}


def register_kind(kind: str, check: BodyCheck) -> None:
    """Let a later feature (rounds, patches, offload) add its message kinds."""
    if kind in KINDS and KINDS[kind] is not check:
        raise ValueError(f"kind {kind!r} already registered")
    KINDS[kind] = check


def decode(payload: bytes | bytearray | memoryview, *, max_bytes: int = MAX_JSON_BYTES,
           expect_sender: str | None = None, kinds: Mapping[str, BodyCheck] | None = None) -> Envelope:
    """Validate ``payload`` and return the Envelope, or raise DecodeError (never anything else).

    ``expect_sender``: the device id taken from the topic; a different ``sender``
    is rejected (a device may not speak for another).
    """
    if len(payload) > max_bytes:
        raise DecodeError("oversize", f"{len(payload)} bytes > limit {max_bytes}")
    try:
        obj = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DecodeError("bad_json", f"not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise DecodeError("bad_json", f"top level must be an object, got {type(obj).__name__}")
    return from_dict(obj, expect_sender=expect_sender, kinds=kinds)


def from_dict(obj: Mapping[str, Any], *, expect_sender: str | None = None,
              kinds: Mapping[str, BodyCheck] | None = None) -> Envelope:
    schema = obj.get("schema")
    if isinstance(schema, bool) or not isinstance(schema, int):
        raise DecodeError("schema", f"missing or non-integer schema version {schema!r}", "schema")
    if schema != SCHEMA_VERSION:
        raise DecodeError("schema", f"unsupported schema version {schema} (we speak {SCHEMA_VERSION})", "schema")
    kind = obj.get("kind")
    if not isinstance(kind, str):
        raise DecodeError("field", "missing or not a string", "kind")
    table = KINDS if kinds is None else kinds
    check = table.get(kind)
    if check is None:
        raise DecodeError("unknown_kind", f"unknown kind {kind!r}", "kind")
    mid = obj.get("id")
    if not isinstance(mid, str) or not (0 < len(mid) <= _ID_MAX):
        raise DecodeError("field", f"must be a string of 1-{_ID_MAX} chars", "id")
    sender = obj.get("sender")
    try:
        validate_id(sender, "sender")
    except InvalidId as exc:
        raise DecodeError("field", str(exc), "sender") from None
    if expect_sender is not None and sender != expect_sender:
        raise DecodeError("sender_mismatch",
                          f"sender {sender!r} does not match the device id {expect_sender!r} in the topic",
                          "sender")
    ts = obj.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts < 0:
        raise DecodeError("field", "must be a non-negative number (unix seconds)", "ts")
    body = obj.get("body", {})
    if not isinstance(body, dict):
        raise DecodeError("field", f"must be an object, got {type(body).__name__}", "body")
    reply_to = obj.get("reply_to")
    if reply_to is not None and (not isinstance(reply_to, str) or not reply_to
                                 or "+" in reply_to or "#" in reply_to or len(reply_to) > 512):
        raise DecodeError("field", "must be a topic name without wildcards", "reply_to")
    corr = obj.get("corr")
    if corr is not None and (not isinstance(corr, str) or not (0 < len(corr) <= _ID_MAX)):
        raise DecodeError("field", f"must be a string of 1-{_ID_MAX} chars", "corr")
    auth = obj.get("auth")
    if auth is not None and (not isinstance(auth, dict) or not all(isinstance(auth.get(k), str)
                                                                    for k in ("alg", "key_id", "sig"))):
        raise DecodeError("field", "must be an object with string alg, key_id and sig", "auth")
    check(body)
    return Envelope(kind=kind, sender=sender, body=body, id=mid, ts=float(ts), schema=schema,
                    reply_to=reply_to, corr=corr, auth=auth)
