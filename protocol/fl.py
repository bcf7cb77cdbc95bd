"""Federated-round messages (schema 1): validators for their bodies.

* ``fl.task``   binary frame, controller → ``dev/{id}/cmd``; tensors = the global head
  (names ``dense{i}.weight`` / ``dense{i}.bias``); signed when the controller has a key.
* ``fl.update`` binary frame, device → ``dev/{id}/data/fl``; tensors = the raw delta
  (local − global), or ``blob`` = the compressed delta (``protocol.compression``).
* ``fl.ack``    JSON, controller → ``dev/{id}/cmd``: accepted or the reason it was not.
* ``fl.head``   binary frame, controller → ``dev/{id}/cmd``: a new global head version.
* ``fl.site_update`` binary frame, site relay → ``dev/{relay}/data/fl``: one update standing for
  several boards of a site (``protocol.sitefl``): tensors = the float32 mean of their deltas
  (combined in float64), ``num_samples`` = their total, ``contributors`` = {board: its samples}.

A task whose strategy can be pre-aggregated at a site says so in ``site_agg`` ("samples" or
"uniform", ``controller.fl.strategies.SITE_WEIGHTINGS``); without it a relay forwards every update.
"""
from __future__ import annotations

from typing import Any, Mapping

from .envelope import DecodeError, _req, register_kind

FL_DATA_LEAF = "fl"
#: how a site relay may combine its boards' updates (the task's ``site_agg``)
SITE_WEIGHTINGS = ("samples", "uniform")
#: most boards one site update may stand for
MAX_CONTRIBUTORS = 10000


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
    w = _req(body, "site_agg", str, optional=True)
    if w is not None and w not in SITE_WEIGHTINGS:
        raise DecodeError("field", f"must be one of {', '.join(SITE_WEIGHTINGS)}, got {w!r}", "body.site_agg")


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


def _check_site_update(body: Mapping[str, Any]) -> None:
    _req(body, "run_id", str)
    _nonneg_int(body, "round")
    _nonneg_int(body, "base_version")
    total = _nonneg_int(body, "num_samples")
    _req(body, "site", str)
    w = _req(body, "weighting", str)
    if w not in SITE_WEIGHTINGS:
        raise DecodeError("field", f"must be one of {', '.join(SITE_WEIGHTINGS)}, got {w!r}", "body.weighting")
    c = _req(body, "contributors", dict)
    if not 1 <= len(c) <= MAX_CONTRIBUTORS:
        raise DecodeError("field", f"must name 1..{MAX_CONTRIBUTORS} boards", "body.contributors")
    for board, n in c.items():
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise DecodeError("field", f"samples of {board!r} must be an integer > 0", "body.contributors")
    if sum(c.values()) != total:
        raise DecodeError("field", f"num_samples {total} != the contributors' total {sum(c.values())}",
                          "body.num_samples")
    _req(body, "train_loss", (int, float), optional=True)


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
register_kind("fl.site_update", _check_site_update)
