"""Model rollout messages (schema 1): offers, chunk requests, chunks, and update reports.

The controller holds each device's *desired* bundle; the device pulls what it lacks.

* ``model.offer``  JSON, controller → ``dev/{id}/cmd`` (signed): "install this". Names the
  target bundle (version + SHA-256 of its manifest), the base it patches (or null for a
  full bundle) and the chunk manifest of the patch file (``protocol.chunks``), so every
  chunk is checked against a hash the controller signed.
* ``xfer.want``    JSON, device → ``dev/{id}/data/xfer``: the chunk indices it still lacks
  (a window of at most ``MAX_WANT``). A device that reconnects mid-transfer asks only for
  what it does not hold on disk.
* ``xfer.chunk``   binary frame, controller → ``dev/{id}/cmd``: one chunk as the frame's blob;
  body ``{transfer_id, index}``. Signed like every controller-channel message.
* ``model.update`` event (``dev/{id}/events``, kind ``event``) with ``event = "model.update"``
  and a ``status`` from ``UPDATE_STATUSES``: what dashboards and the rollout runner read.
"""
from __future__ import annotations

from typing import Any, Mapping

from .chunks import ChunkError, ChunkManifest
from .envelope import DecodeError, _req, register_kind

XFER_DATA_LEAF = "xfer"
MAX_WANT = 64

#: every step of an update on a device, in order; the last four are final
UPDATE_STATUSES = ("offered", "downloading", "received", "verified", "staged", "healthy",
                   "applied", "failed", "rolled_back", "unchanged")
FINAL_STATUSES = ("applied", "failed", "rolled_back", "unchanged")


def _hex64(body: Mapping[str, Any], name: str, optional: bool = False) -> str | None:
    v = _req(body, name, str, optional=optional)
    if v is not None and (len(v) != 64 or any(c not in "0123456789abcdef" for c in v)):
        raise DecodeError("field", "must be 64 lowercase hex chars", f"body.{name}")
    return v


def _ref(body: Mapping[str, Any], name: str, optional: bool) -> None:
    ref = _req(body, name, dict, optional=optional)
    if ref is None:
        return
    v = ref.get("version")
    if not isinstance(v, str) or not (0 < len(v) <= 64):
        raise DecodeError("field", "must be a 1-64 char string", f"body.{name}.version")
    _hex64(ref, "bundle_sha256")


def offer_manifest(body: Mapping[str, Any]) -> ChunkManifest:
    """The chunk manifest inside a validated ``model.offer`` body."""
    return ChunkManifest.from_dict(body["transfer"])


def _check_offer(body: Mapping[str, Any]) -> None:
    rid = _req(body, "rollout_id", str, optional=True)
    if rid is not None and not (0 < len(rid) <= 64):
        raise DecodeError("field", "must be 1-64 chars", "body.rollout_id")
    _ref(body, "target", optional=False)
    _ref(body, "base", optional=True)
    _req(body, "transfer", dict)
    try:
        offer_manifest(body)
    except ChunkError as exc:
        raise DecodeError("field", str(exc), "body.transfer") from None
    _req(body, "allow_downgrade", bool, optional=True)


def _check_want(body: Mapping[str, Any]) -> None:
    tid = _req(body, "transfer_id", str)
    if not (0 < len(tid) <= 64):
        raise DecodeError("field", "must be 1-64 chars", "body.transfer_id")
    chunks = _req(body, "chunks", list)
    if len(chunks) > MAX_WANT or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 65536
                                         for i in chunks):
        raise DecodeError("field", f"must be at most {MAX_WANT} chunk indices in 0..65535", "body.chunks")
    for name in ("have", "total"):
        v = _req(body, name, int, optional=True)
        if v is not None and v < 0:
            raise DecodeError("field", "must be >= 0", f"body.{name}")


def _check_chunk(body: Mapping[str, Any]) -> None:
    tid = _req(body, "transfer_id", str)
    if not (0 < len(tid) <= 64):
        raise DecodeError("field", "must be 1-64 chars", "body.transfer_id")
    i = _req(body, "index", int)
    if not (0 <= i < 65536):
        raise DecodeError("field", "must be 0..65535", "body.index")


def check_update_event(body: Mapping[str, Any]) -> None:
    """Validate a ``model.update`` event body (the controller ingests these from devices)."""
    status = _req(body, "status", str)
    if status not in UPDATE_STATUSES:
        raise DecodeError("field", f"unknown update status {status!r}", "body.status")
    _req(body, "rollout_id", str, optional=True)
    _req(body, "transfer_id", str, optional=True)
    _req(body, "reason", str, optional=True)
    _req(body, "version", str, optional=True)
    _hex64(body, "bundle_sha256", optional=True)


register_kind("model.offer", _check_offer)
register_kind("xfer.want", _check_want)
register_kind("xfer.chunk", _check_chunk)
