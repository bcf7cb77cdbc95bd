"""Offload messages (schema 1) and the workers' shared subscription.

* ``offload.request`` — binary frame, device → ``{root}/v1/offload/req``; tensor ``x`` holds the
  backbone features (split computing; uint8-quantized with ``scale``) or the raw input (float32);
  ``reply_to`` inside the device's own subtree, ``corr`` to match the answer.
  Additive (protocol/exits.py): ``split`` (backbone + cut tensor, 16 hex) and ``exit`` (which
  exit's tensor ``x`` is) replace ``backbone_sha256`` for features sent from an exit; with
  ``codec: "int8+zstd"`` and ``bottleneck`` (the encoder/decoder pair id) ``x`` is the int8
  bottleneck code and the frame's payload is zstd-compressed.
* ``offload.reply`` — JSON, worker → the request's ``reply_to``; a refusal may carry ``reason``
  (``split_mismatch``, ``decoder_mismatch``, ``bad_shape``).
* ``offload.status`` — JSON, retained, worker → ``{root}/v1/offload/workers/{worker}``.

Workers subscribe to ``$share/{group}/{root}/v1/offload/req`` (MQTT 5), so N workers split the
load. On an MQTT 3.1.1 broker there is no shared subscription: every worker sees every request
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


def _check_request(body: Mapping[str, Any]) -> None:
    mode = _req(body, "mode", str)
    if mode not in ("features", "raw"):
        raise DecodeError("field", f"must be 'features' or 'raw', got {mode!r}", "body.mode")
    _req(body, "deadline_ts", (int, float))
    _req(body, "model", str)
    if mode == "features":
        # features from an exit / through a bottleneck name their split instead of the backbone
        if "split" in body:
            _req(body, "split", str)
            k = _req(body, "exit", int)
            if k < 0:
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
        return
    _req(body, "label", int)
    conf = _req(body, "confidence", (int, float))
    if not (0 <= conf <= 1):
        raise DecodeError("field", "must be in [0, 1]", "body.confidence")
    _req(body, "worker", str)


def _check_status(body: Mapping[str, Any]) -> None:
    _req(body, "worker", str)
    _req(body, "served", int)


register_kind("offload.request", _check_request)
register_kind("offload.reply", _check_reply)
register_kind("offload.status", _check_status)
