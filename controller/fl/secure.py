"""Secure rounds: one ``SecAggServer`` session per (run, round), driven by the round runner.

With ``secagg`` in a run's config ({"max_dropout": 0.3, "stage_s": 15}) the task tells each
device to aggregate securely: it trains, then speaks ``fl.secagg`` instead of sending its update
(``protocol.secagg``). Each stage ends when every expected device answered or ``stage_s`` after
it began (the advertise stage: at the round's deadline). The session's result — Σ nᵢ·Δᵢ and
Σ nᵢ, never any single update — becomes the round's one aggregated update, filed under the
device id ``secagg``; the controller never holds an individual update.

What composes: FedAvg, FedProx, FedAvgM, FedAdam/FedYogi (they only need the weighted mean).
What cannot: the robust aggregators (median, trimmed mean, Krum need every update), FedBuff
(asynchronous: no round to mask over) and SCAFFOLD (it averages Δc uniformly); top-k
compression (each board keeps other coordinates, and masks make every coordinate non-zero) and
int8/zstd on the wire (a masked vector is uniform in Z/2^64: it neither quantizes nor
compresses). DP: boards clip before masking; the controller adds the noise once, to the unmasked
mean, calibrated as if it were one update (sensitivity 1: conservative, since it cannot see the
weights). Sessions live in memory: a controller restart fails the round in progress (its
deadline passes), and the next round starts a new session.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import time
from typing import Any, Mapping, Sequence

import numpy as np

from protocol.secagg import SecAggError, SecAggServer
from protocol.secagg_wire import flatten, from_wire, to_wire  # noqa: F401 - flatten: what boards mask

SECAGG_ID = "secagg"
COMPOSES = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")


@dataclass(frozen=True)
class SecAggConfig:
    max_dropout: float = 0.3
    stage_s: float = 15.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "SecAggConfig | None":
        if not d:
            return None
        unknown = set(d) - {"max_dropout", "stage_s"}
        if unknown:
            raise ValueError(f"unknown secagg settings: {', '.join(sorted(unknown))}")
        c = cls(float(d.get("max_dropout", 0.3)), float(d.get("stage_s", 15.0)))
        if not 0 <= c.max_dropout < 0.5 or not 0 < c.stage_s <= 3600:
            raise ValueError("secagg needs 0 <= max_dropout < 0.5 and 0 < stage_s <= 3600")
        return c


def check_composes(strategy: str, compression: Mapping[str, Any], cfg: SecAggConfig | None) -> None:
    if cfg is None:
        return
    if strategy not in COMPOSES:
        raise ValueError(f"secure aggregation needs a mean-based strategy ({', '.join(COMPOSES)}), not {strategy}")
    if compression:
        raise ValueError("secure aggregation sends masked vectors: drop --compress (they do not compress)")


def unflatten(total: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> tuple[dict[str, np.ndarray], float]:
    """(Σ nᵢΔᵢ / Σ nᵢ as tensors, Σ nᵢ)."""
    n = float(total[-1])
    out, at = {}, 0
    for k in sorted(shapes):
        size = int(np.prod(shapes[k])) if shapes[k] else 1
        out[k] = (total[at:at + size] / n).reshape(shapes[k]).astype(np.float32)
        at += size
    return out, n


def vector_length(shapes: Mapping[str, tuple[int, ...]]) -> int:
    return sum(int(np.prod(s)) if s else 1 for s in shapes.values()) + 1


@dataclass
class SecureRound:
    run_id: str
    round_no: int
    selected: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    cfg: SecAggConfig
    deadline: float
    server: SecAggServer = field(init=False)
    stage_ends: float = field(init=False)
    started: float = field(default_factory=time.time)
    bytes_in: int = 0
    bytes_out: int = 0

    def __post_init__(self) -> None:
        self.server = SecAggServer(self.session, vector_length(self.shapes), max_dropout=self.cfg.max_dropout,
                                   min_clients=2)
        self.stage_ends = self.deadline

    @property
    def session(self) -> str:
        return f"{self.run_id}#{self.round_no}"

    def expected(self) -> set[str]:
        s = self.server
        if s.state == "advertise":
            return set(self.selected)
        if s.state == "share":
            return {c for c, _, _ in s.roster.clients} if s.roster else set()
        if s.state == "mask":
            return set(s._shares)
        if s.state == "unmask":
            return set(s.survivors)
        return set()

    def answered(self) -> set[str]:
        s = self.server
        return {"advertise": set(s._ads), "share": set(s._shares), "mask": set(s._masked),
                "unmask": set(s._reveals)}.get(s.state, set())

    def on_message(self, device_id: str, body: Mapping[str, Any], tensors, size: int) -> str | None:
        """Feed one device message; None, or the reason it was refused."""
        self.bytes_in += size
        try:
            m = from_wire(body, tensors)
            handler = {"advertise": self.server.on_advertise, "shares": self.server.on_shares,
                       "masked": self.server.on_masked, "reveal": self.server.on_reveal}.get(body.get("stage"))
            if handler is None:
                raise SecAggError(f"stage {body.get('stage')!r} is not sent by devices")
            handler(device_id, m)
        except SecAggError as exc:
            return exc.reason
        return None

    def poll(self, now: float) -> list[tuple[str, dict[str, Any]]]:
        """Close the stage that is due: (device, body) messages to send (empty if none due)."""
        s = self.server
        if s.state in ("done", "failed"):
            return []
        if self.expected() - self.answered() and now < self.stage_ends:
            return []
        out: list[tuple[str, dict[str, Any]]] = []
        if s.state == "advertise":
            r = s.close_advertise()
            if r is not None:
                body = to_wire(r)[0]
                out = [(c, body) for c, _, _ in r.clients]
        elif s.state == "share":
            out = [(box.to, to_wire(box)[0]) for box in s.close_share()]
        elif s.state == "mask":
            req = s.close_mask()
            if req is not None:
                body = to_wire(req)[0]
                out = [(c, body) for c in req.survivors]
        elif s.state == "unmask":
            return []   # the caller takes ``result`` once every survivor revealed or the stage is over
        self.stage_ends = now + self.cfg.stage_s
        return out

    def ready(self, now: float) -> bool:
        s = self.server
        return s.state == "failed" or (s.state == "unmask" and (not (self.expected() - self.answered())
                                                                or now >= self.stage_ends))

    def result(self) -> tuple[dict[str, np.ndarray], float, dict[str, Any]]:
        """(mean update, Σ samples, metrics); raises ``SecAggError`` when the session failed."""
        total = self.server.result()
        mean, n = unflatten(total, self.shapes)
        s = self.server
        return mean, n, {"secagg_clients": len(s.survivors), "secagg_dropped": list(s.dropped),
                         "secagg_refused": [{"device": c, "reason": r} for c, r in s.refused],
                         "secagg_bytes": self.bytes_in + self.bytes_out,
                         "secagg_seconds": round(time.time() - self.started, 3)}

