"""Offload messages (schema 1) and the workers' shared subscription.

* ``offload.request`` — binary frame, device → ``{root}/v1/offload/req``; tensor ``x`` holds the
  backbone features (split computing; uint8-quantized with ``scale``) or the raw input (float32);
  ``reply_to`` inside the device's own subtree, ``corr`` to match the answer.
* ``offload.reply`` — JSON, worker → the request's ``reply_to``.
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
        _req(body, "backbone_sha256", str)
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
