"""Federated-round messages (schema 1): validators for their bodies.

* ``fl.task``   binary frame, controller → ``dev/{id}/cmd``; tensors = the global head
  (names ``dense{i}.weight`` / ``dense{i}.bias``); signed when the controller has a key.
* ``fl.update`` binary frame, device → ``dev/{id}/data/fl``; tensors = the raw delta
  (local − global), or ``blob`` = the compressed delta (``protocol.compression``).
* ``fl.ack``    JSON, controller → ``dev/{id}/cmd``: accepted or the reason it was not.
* ``fl.head``   binary frame, controller → ``dev/{id}/cmd``: a new global head version.
"""
from __future__ import annotations

from typing import Any, Mapping

from .envelope import DecodeError, _req, register_kind

FL_DATA_LEAF = "fl"


def _nonneg_int(body: Mapping[str, Any], name: str) -> int:
    v = _req(body, name, int)
    if v < 0:
        raise DecodeError("field", "must be >= 0", f"body.{name}")
    return v


def _check_task(body: Mapping[str, Any]) -> None:
    _req(body, "run_id", str)
    _nonneg_int(body, "round")
    _nonneg_int(body, "base_version")
    steps = _nonneg_int(body, "steps")
    if not (1 <= steps <= 100000):
        raise DecodeError("field", "must be 1..100000", "body.steps")
    lr = _req(body, "lr", (int, float))
    if not (0 < lr < 10):
        raise DecodeError("field", "must be in (0, 10)", "body.lr")
    bs = _nonneg_int(body, "batch_size")
    if not (1 <= bs <= 65536):
        raise DecodeError("field", "must be 1..65536", "body.batch_size")
    _req(body, "prox_mu", (int, float))
    _req(body, "deadline_ts", (int, float))
    _req(body, "compression", dict, optional=True)
    _req(body, "dp", dict, optional=True)
    _req(body, "optimizer", str, optional=True)


def _check_update(body: Mapping[str, Any]) -> None:
    _req(body, "run_id", str)
    _nonneg_int(body, "round")
    _nonneg_int(body, "base_version")
    _nonneg_int(body, "num_samples")
    enc = _req(body, "encoding", str)
    if enc not in ("raw", "compressed"):
        raise DecodeError("field", f"must be 'raw' or 'compressed', got {enc!r}", "body.encoding")
    for name in ("train_loss", "train_time_s", "samples_per_s"):
        _req(body, name, (int, float), optional=True)


def _check_ack(body: Mapping[str, Any]) -> None:
    _req(body, "run_id", str)
    _nonneg_int(body, "round")
    _req(body, "accepted", bool)
    _req(body, "reason", str)


def _check_head(body: Mapping[str, Any]) -> None:
    _req(body, "run_id", str, optional=True)
    _nonneg_int(body, "version")


register_kind("fl.task", _check_task)
register_kind("fl.update", _check_update)
register_kind("fl.ack", _check_ack)
register_kind("fl.head", _check_head)
