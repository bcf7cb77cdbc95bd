"""Secure-aggregation messages on the wire: one kind, ``fl.secagg``, a binary frame whose body says
the ``stage``; keys, commitments and sealed shares travel base64 in the JSON body, a masked vector
as one int64 tensor (the uint64 words' bits). ``from_wire`` refuses anything malformed with a
``SecAggError`` naming the field; ``size_of`` is a message's whole frame size (envelope included),
the figure the benchmark counts. ``run_local`` plays a whole session in memory.
"""
from __future__ import annotations

import base64
import os
from typing import Any, Mapping, Sequence

import numpy as np

from .binary import encode_frame
from .envelope import Envelope, _req, register_kind
from .secagg import (Advertise, Inbox, Masked, Reveal, Roster, SecAggClient, SecAggError, SecAggServer, Shares,
                     UnmaskRequest)

KIND = "fl.secagg"
STAGES = ("advertise", "roster", "shares", "inbox", "masked", "unmask", "reveal", "refused")


def flatten(delta: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """What a board masks for a weighted mean: n·Δ (tensors in sorted name order, float64), then n."""
    return np.concatenate([(n * np.asarray(delta[k], np.float64)).ravel() for k in sorted(delta)] + [[float(n)]])


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(v: Any, where: str) -> bytes:
    if not isinstance(v, str) or len(v) > 1 << 20:
        raise SecAggError(f"{where}: not a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except ValueError:
        raise SecAggError(f"{where}: not valid base64") from None


def _shares_out(d: Mapping[str, tuple[int, bytes]]) -> dict[str, list]:
    return {k: [int(i), _b64(s)] for k, (i, s) in d.items()}


def _shares_in(d: Any, where: str) -> dict[str, tuple[int, bytes]]:
    if not isinstance(d, dict):
        raise SecAggError(f"{where}: not an object")
    out = {}
    for k, v in d.items():
        if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], int) and not isinstance(v[0], bool)):
            raise SecAggError(f"{where}.{k}: a share is [index, base64]")
        out[str(k)] = (v[0], _unb64(v[1], f"{where}.{k}"))
    return out


def to_wire(m: Any) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """(body, tensors) of a message."""
    if isinstance(m, Advertise):
        return {"stage": "advertise", "session": m.session, "client": m.client, "c_pk": _b64(m.c_pk),
                "s_pk": _b64(m.s_pk)}, None
    if isinstance(m, Roster):
        return {"stage": "roster", "session": m.session, "threshold": m.threshold, "length": m.length,
                "scale_bits": m.scale_bits, "clients": [[c, _b64(a), _b64(b)] for c, a, b in m.clients]}, None
    if isinstance(m, Shares):
        return {"stage": "shares", "session": m.session, "client": m.client, "b_commit": m.b_commit,
                "sealed": {k: _b64(v) for k, v in m.sealed.items()}}, None
    if isinstance(m, Inbox):
        return {"stage": "inbox", "session": m.session, "to": m.to, "shared": list(m.shared),
                "sealed": {k: _b64(v) for k, v in m.sealed.items()}}, None
    if isinstance(m, Masked):
        return ({"stage": "masked", "session": m.session, "client": m.client},
                {"y": np.asarray(m.vector, np.uint64).view(np.int64)})
    if isinstance(m, UnmaskRequest):
        return {"stage": "unmask", "session": m.session, "survivors": list(m.survivors),
                "dropped": list(m.dropped)}, None
    if isinstance(m, Reveal):
        return {"stage": "reveal", "session": m.session, "client": m.client, "b_shares": _shares_out(m.b_shares),
                "sk_shares": _shares_out(m.sk_shares)}, None
    raise TypeError(f"not a secagg message: {type(m).__name__}")


def _strs(v: Any, where: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise SecAggError(f"{where}: a list of client ids")
    return tuple(v)


def from_wire(body: Mapping[str, Any], tensors: Mapping[str, np.ndarray] | None = None) -> Any:
    try:
        stage, session = body["stage"], body["session"]
        if not isinstance(session, str):
            raise SecAggError("session: not a string")
        if stage == "advertise":
            return Advertise(session, str(body["client"]), _unb64(body["c_pk"], "c_pk"), _unb64(body["s_pk"], "s_pk"))
        if stage == "roster":
            cl = body["clients"]
            if not isinstance(cl, list) or not all(isinstance(c, list) and len(c) == 3 for c in cl):
                raise SecAggError("clients: a list of [id, c_pk, s_pk]")
            return Roster(session, int(body["threshold"]),
                          tuple((str(c), _unb64(a, "c_pk"), _unb64(b, "s_pk")) for c, a, b in cl),
                          int(body["length"]), int(body["scale_bits"]))
        if stage == "shares":
            sealed = body["sealed"]
            if not isinstance(sealed, dict) or not isinstance(body["b_commit"], str):
                raise SecAggError("sealed/b_commit malformed")
            return Shares(session, str(body["client"]), body["b_commit"],
                          {str(k): _unb64(v, f"sealed.{k}") for k, v in sealed.items()})
        if stage == "inbox":
            sealed = body["sealed"]
            if not isinstance(sealed, dict):
                raise SecAggError("sealed: not an object")
            return Inbox(session, str(body["to"]), _strs(body["shared"], "shared"),
                         {str(k): _unb64(v, f"sealed.{k}") for k, v in sealed.items()})
        if stage == "masked":
            y = (tensors or {}).get("y")
            if y is None or y.dtype != np.int64 or y.ndim != 1:
                raise SecAggError("masked: needs one int64 vector 'y'")
            return Masked(session, str(body["client"]), np.asarray(y).view(np.uint64))
        if stage == "unmask":
            return UnmaskRequest(session, _strs(body["survivors"], "survivors"), _strs(body["dropped"], "dropped"))
        if stage == "reveal":
            return Reveal(session, str(body["client"]), _shares_in(body["b_shares"], "b_shares"),
                          _shares_in(body["sk_shares"], "sk_shares"))
    except KeyError as exc:
        raise SecAggError(f"missing field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SecAggError):
            raise
        raise SecAggError(f"malformed {body.get('stage')!r} message: {exc}") from None
    raise SecAggError(f"unknown stage {stage!r}")


def size_of(m: Any, sender: str = "dev-000") -> int:
    body, tensors = to_wire(m)
    return len(encode_frame(Envelope(kind=KIND, sender=sender, body=body), tensors))


def size_of_body(body: Mapping[str, Any], sender: str = "controller") -> int:
    """A JSON ``fl.secagg`` envelope's size (what the controller sends)."""
    from .envelope import encode

    return len(encode(Envelope(kind=KIND, sender=sender, body=dict(body))))


def _check(body: Mapping[str, Any]) -> None:
    _req(body, "session", str)
    stage = _req(body, "stage", str)
    if stage not in STAGES:
        from .envelope import DecodeError

        raise DecodeError("field", f"unknown stage {stage!r}", "body.stage")


register_kind(KIND, _check)


def run_local(vectors: Mapping[str, np.ndarray], *, drop_before_mask: Sequence[str] = (),
              drop_before_reveal: Sequence[str] = (), max_dropout: float = 0.3, session: str | None = None
              ) -> tuple[np.ndarray, SecAggServer, dict[str, int]]:
    """One whole session in memory (benchmarks, tests): (sum over survivors, server, bytes per stage)."""
    session = session or os.urandom(8).hex()
    n = len(next(iter(vectors.values())))
    srv = SecAggServer(session, n, max_dropout=max_dropout, min_clients=2)
    clients = {c: SecAggClient(session, c) for c in vectors}
    sizes = {"advertise": 0, "roster": 0, "shares": 0, "inbox": 0, "masked": 0, "unmask": 0, "reveal": 0}
    for c, cl in clients.items():
        m = cl.advertise()
        sizes["advertise"] += size_of(m)
        srv.on_advertise(c, m)
    roster = srv.close_advertise()
    if roster is None:
        raise SecAggError(srv.error or "failed")
    for c, cl in clients.items():
        sizes["roster"] += size_of(roster)
        m = cl.on_roster(roster)
        sizes["shares"] += size_of(m)
        srv.on_shares(c, m)
    for box in srv.close_share():
        sizes["inbox"] += size_of(box)
        if box.to in drop_before_mask:
            continue
        m = clients[box.to].on_inbox(box, vectors[box.to])
        sizes["masked"] += size_of(m)
        srv.on_masked(box.to, m)
    req = srv.close_mask()
    if req is None:
        raise SecAggError(srv.error or "failed")
    for c in req.survivors:
        sizes["unmask"] += size_of(req)
        if c in drop_before_reveal:
            continue
        m = clients[c].on_unmask(req)
        sizes["reveal"] += size_of(m)
        srv.on_reveal(c, m)
    return srv.result(), srv, sizes
