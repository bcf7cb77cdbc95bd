"""Offload messages (schema 1) and the workers' shared subscription.

* ``offload.request`` — binary frame, device → ``{root}/v1/offload/req``; tensor ``x`` holds the
  backbone features (split computing; uint8-quantized with ``scale``) or the raw input (float32);
  ``reply_to`` inside the device's own subtree, ``corr`` to match the answer.
  Additive (protocol/exits.py): ``split`` (backbone + cut tensor, 16 hex) and ``exit`` (which
  exit's tensor ``x`` is) replace ``backbone_sha256`` for features sent from an exit; with
  ``codec: "int8+zstd"`` and ``bottleneck`` (the encoder/decoder pair id) ``x`` is the int8
  bottleneck code and the frame's payload is zstd-compressed.
* ``offload.reply`` — JSON, worker → the request's ``reply_to``; a refusal carries ``code``
  (``split_mismatch``, ``decoder_mismatch`` for exit/bottleneck features that do not match).
* ``offload.status`` — JSON, retained, worker → ``{root}/v1/offload/workers/{worker}``.

Workers subscribe to ``$share/{group}/{root}/v1/offload/req`` (MQTT 5), so N workers split the
load. Deadline scheduling (docs/protocol.md, "Offload"): a request also carries ``budget_ms``,
the time left at send (the worker adds it to its own receive time: no clock agreement needed);
boards that know the workers (their retained status says what each accepts and its queue
estimate) route to one worker's own topic ``{root}/v1/offload/req/{worker}``; an idle worker
asks a busy one for work on ``{root}/v1/offload/steal/{victim}`` and gets it forwarded to its own
topic. A worker that cannot finish in time answers at once ``ok: false`` with ``code``. On an MQTT 3.1.1 broker there is no shared subscription: every worker sees every request
and answers it; the device keeps the first answer per ``corr`` and counts the others.
"""
from __future__ import annotations

from typing import Any, Mapping

from .envelope import DecodeError, _req, register_kind

SHARE_GROUP = "edgefleet-workers"


def shared(topic: str, group: str = SHARE_GROUP) -> str:
    return f"$share/{group}/{topic}"


def worker_status_topic(base: str, worker: str) -> str:
    return f"{base}/offload/workers/{worker}"


def worker_req_topic(base: str, worker: str) -> str:
    """One worker's own request topic (routed requests and stolen work)."""
    return f"{base}/offload/req/{worker}"


def steal_topic(base: str, victim: str) -> str:
    return f"{base}/offload/steal/{victim}"


# reason codes of an ``ok: false`` offload.reply (``code``)
DROP_DEADLINE = "deadline"          # cannot finish before the deadline: answer locally now
DROP_BUSY = "busy"                  # the worker's bounded queue is full
REFUSED_INCOMPATIBLE = "incompatible"   # mode/split/input this worker does not accept
REFUSED_BAD_INPUT = "bad_input"
REFUSED_SPLIT = "split_mismatch"        # features from another backbone/cut (another split version)
REFUSED_DECODER = "decoder_mismatch"    # a bottleneck code from another encoder/decoder pair
REPLY_CODES = (DROP_DEADLINE, DROP_BUSY, REFUSED_INCOMPATIBLE, REFUSED_BAD_INPUT, REFUSED_SPLIT, REFUSED_DECODER,
               "error")


def _opt_num(body: Mapping[str, Any], key: str, positive: bool = False) -> None:
    v = body.get(key)
    if v is None:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
        raise DecodeError("field", "must be a number", f"body.{key}")
    if v < 0 or (positive and v == 0):
        raise DecodeError("field", "must be > 0" if positive else "must be >= 0", f"body.{key}")


def _check_request(body: Mapping[str, Any]) -> None:
    mode = _req(body, "mode", str)
    if mode not in ("features", "raw"):
        raise DecodeError("field", f"must be 'features' or 'raw', got {mode!r}", "body.mode")
    _req(body, "deadline_ts", (int, float))
    _opt_num(body, "budget_ms", positive=True)
    _req(body, "model", str)
    if mode == "features":
        # features from an exit / through a bottleneck name their split instead of the backbone
        if "split" in body:
            _req(body, "split", str)
            k = _req(body, "exit", int, optional=True)
            if k is not None and k < 0:
                raise DecodeError("field", "must be >= 0", "body.exit")
        else:
            _req(body, "backbone_sha256", str)
        if body.get("codec") is not None:   # the code's scale is the bottleneck pair's own
            if body["codec"] not in ("int8+zstd",):
                raise DecodeError("field", f"unknown codec {body['codec']!r}", "body.codec")
            _req(body, "bottleneck", str)
        else:
            s = _req(body, "scale", (int, float))
            if not s > 0:
                raise DecodeError("field", "must be > 0", "body.scale")


def _check_reply(body: Mapping[str, Any]) -> None:
    ok = _req(body, "ok", bool)
    if not ok:
        _req(body, "error", str)
        code = body.get("code")
        if code is not None and code not in REPLY_CODES:
            raise DecodeError("field", f"unknown reason code {code!r}", "body.code")
        return
    _req(body, "label", int)
    conf = _req(body, "confidence", (int, float))
    if not (0 <= conf <= 1):
        raise DecodeError("field", "must be in [0, 1]", "body.confidence")
    _req(body, "worker", str)


def _check_status(body: Mapping[str, Any]) -> None:
    _req(body, "worker", str)
    _req(body, "served", int)
    for k in ("queue_ms", "service_ms", "service_tail_ms"):
        _opt_num(body, k)
    q = body.get("queue_len")
    if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 0):
        raise DecodeError("field", "must be an int >= 0", "body.queue_len")
    acc = body.get("accepts")
    if acc is not None:
        if not isinstance(acc, dict) or not isinstance(acc.get("raw", False), bool) \
                or not isinstance(acc.get("splits", []), list) \
                or not all(isinstance(x, str) for x in acc.get("splits", [])):
            raise DecodeError("field", "must be {raw: bool, splits: [hash, …]}", "body.accepts")


def _check_steal(body: Mapping[str, Any]) -> None:
    _req(body, "thief", str)
    n = _req(body, "n", int)
    if not 1 <= n <= 64:
        raise DecodeError("field", "must be in 1..64", "body.n")
    _opt_num(body, "service_ms")


register_kind("offload.request", _check_request)
register_kind("offload.reply", _check_reply)
register_kind("offload.status", _check_status)
register_kind("offload.steal", _check_steal)
