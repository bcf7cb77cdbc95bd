"""Site-level aggregation of a federated round: the pure part (no sockets, no files).

A site relay collects its boards' ``fl.update``s for a round and sends ONE ``fl.site_update``
upstream. ``combine`` is the maths (float64 accumulation, float32 on the wire); ``SiteRound`` is
the relay's sans-IO state machine for one (run, round): which boards it expects, what it holds,
when it sends, and what the controller's answer asks of it next.

Why it is exact: FedAvg's result is Σᵢ nᵢ·Δᵢ / Σᵢ nᵢ. Grouping the boards by site,
Σ_s N_s·(Σ_{i∈s} nᵢ·Δᵢ / N_s) / Σ_s N_s is the same sum, so a site's sample-weighted mean with
weight N_s (its total) loses nothing but float rounding. SCAFFOLD's means are uniform: the same
with nᵢ = 1. Robust aggregators (median, trimmed mean, Krum) need every update: no ``site_agg``
in their tasks, and the relay forwards each update as it came.

The site deadline (``site_deadline``): the relay sends what it has when every board it expects
has answered, or at the round's deadline minus max(``MIN_MARGIN_S``, ``MARGIN_FRACTION`` of the
time the round had left when the relay saw its task) — the margin is the uplink's time to carry
the aggregate and the controller's to record it before its own deadline. A board that misses the
site deadline is a dropout of that board (its late update is forwarded on its own: the
controller's deadline decides it), never a failure of the site.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from .fl import SITE_WEIGHTINGS

Head = dict[str, np.ndarray]

MIN_MARGIN_S = 2.0
MARGIN_FRACTION = 0.1
#: a round's tasks reach a site one by one: "every tasked board answered" counts only once no new
#: task has come for this long (a task later still makes a late board, whose update is forwarded)
TASK_SETTLE_S = 1.5


def site_deadline(round_deadline: float, seen_at: float) -> float:
    """When a relay sends its site's aggregate at the latest (see the module docstring)."""
    left = max(0.0, round_deadline - seen_at)
    return round_deadline - max(MIN_MARGIN_S, MARGIN_FRACTION * left)


@dataclass(frozen=True)
class BoardUpdate:
    board: str
    num_samples: int
    delta: Mapping[str, np.ndarray]
    train_loss: float | None = None


@dataclass(frozen=True)
class SiteAggregate:
    mean: Head                       # float32 (combined in float64)
    num_samples: int                 # Σ nᵢ: the site's weight under "samples"
    contributors: dict[str, int]     # board -> its samples
    train_loss: float | None = None  # sample-weighted mean of the boards' losses


def combine(updates: Sequence[BoardUpdate], weighting: str) -> SiteAggregate:
    """The site's one update: Σ wᵢΔᵢ / Σ wᵢ in float64, wᵢ = nᵢ ("samples") or 1 ("uniform")."""
    if weighting not in SITE_WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(SITE_WEIGHTINGS)}, got {weighting!r}")
    if not updates:
        raise ValueError("no board updates to combine")
    boards = [u.board for u in updates]
    if len(set(boards)) != len(boards):
        raise ValueError("a board appears twice")
    ref = {k: np.shape(v) for k, v in updates[0].delta.items()}
    acc = {k: np.zeros(s, np.float64) for k, s in ref.items()}
    total_w = 0.0
    for u in updates:
        if {k: np.shape(v) for k, v in u.delta.items()} != ref:
            raise ValueError(f"{u.board}: tensors differ from {updates[0].board}'s")
        if u.num_samples <= 0:
            raise ValueError(f"{u.board}: num_samples must be > 0")
        w = float(u.num_samples) if weighting == "samples" else 1.0
        for k in acc:
            acc[k] += w * np.asarray(u.delta[k], np.float64)
        total_w += w
    losses = [(u.num_samples, u.train_loss) for u in updates if isinstance(u.train_loss, (int, float))]
    loss = (sum(n * l for n, l in losses) / sum(n for n, _ in losses)) if losses else None
    return SiteAggregate({k: (v / total_w).astype(np.float32) for k, v in acc.items()},
                         int(sum(u.num_samples for u in updates)), {u.board: int(u.num_samples) for u in updates},
                         loss)


@dataclass
class SiteRound:
    """One round at one relay. ``weighting`` None: the task did not allow pre-aggregation, so every
    update is forwarded on arrival. States: ``collecting`` → ``sent`` (awaiting the controller's
    ``fl.ack``) → ``done``; a refusal naming boards (``exclude``) goes back to ``collecting`` without
    them (and those boards' own updates go up: counted elsewhere, the controller answers them as
    duplicates; not members of this site, it decides them on their own); any other refusal ends in
    ``forward`` (each board's own update goes up, so each board gets the controller's own verdict)."""
    run_id: str
    round_no: int
    base_version: int
    deadline: float
    seen_at: float
    weighting: str | None
    tasked: set[str] = field(default_factory=set)
    updates: dict[str, BoardUpdate] = field(default_factory=dict)
    excluded: set[str] = field(default_factory=set)
    state: str = "collecting"
    sent_contributors: tuple[str, ...] = ()
    reason: str = ""
    last_task_at: float = 0.0

    def tasked_board(self, board: str, now: float) -> bool:
        """A task for ``board`` was seen; True if it is new."""
        if board in self.tasked:
            return False
        self.tasked.add(board)
        self.last_task_at = now
        return True

    @property
    def key(self) -> str:
        return f"{self.run_id}#{self.round_no}"

    @property
    def send_by(self) -> float:
        return site_deadline(self.deadline, self.seen_at)

    def accepts(self, board: str, body: Mapping[str, Any]) -> str:
        """What to do with a board's update: "hold" (aggregate it), "forward" (send it up as it is),
        "duplicate" (already held: a resend while the controller has not acked it yet)."""
        if self.weighting is None or self.state == "forward":
            return "forward"
        if body.get("encoding") not in ("raw", "compressed") or int(body.get("base_version", -1)) != self.base_version:
            return "forward"      # the controller gives the board its own verdict
        if board in self.updates:
            return "duplicate"
        if self.state != "collecting" or board in self.excluded:
            return "forward"      # late for the site (or counted elsewhere): the controller decides
        return "hold"

    def due(self, now: float, local: set[str]) -> bool:
        """Send now? Every tasked board that is at this site has answered (and no task came for
        ``TASK_SETTLE_S``), or the site deadline."""
        if self.state != "collecting" or not self.pending_updates():
            return False
        waiting = {b for b in self.tasked if b in local} - set(self.updates) - self.excluded
        return (not waiting and now - self.last_task_at >= TASK_SETTLE_S) or now >= self.send_by

    def pending_updates(self) -> list[BoardUpdate]:
        return [u for b, u in sorted(self.updates.items()) if b not in self.excluded]

    def build(self) -> SiteAggregate:
        agg = combine(self.pending_updates(), str(self.weighting))
        self.state = "sent"
        self.sent_contributors = tuple(sorted(agg.contributors))
        return agg

    def on_ack(self, body: Mapping[str, Any]) -> str:
        """The controller's answer: "done", "rebuild" (send again without ``exclude``), "forward"."""
        if body.get("accepted"):
            self.state = "done"
            return "done"
        self.reason = str(body.get("reason", ""))
        exclude = [str(b) for b in body.get("exclude") or () if isinstance(b, str)]
        if exclude and set(exclude) & set(self.sent_contributors):
            self.excluded |= set(exclude)
            self.state = "collecting"
            return "rebuild" if self.pending_updates() else "done"
        self.state = "forward"
        return "forward"
