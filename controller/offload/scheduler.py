"""A worker's deadline scheduler (sans-IO): a bounded EDF queue that drops hopeless work at once.

DEMS-A's three moves, for one worker: (1) order by deadline (earliest deadline first,
non-preemptive); (2) admit a request only if, by the measured service time, it can finish
before its deadline where EDF would put it — otherwise drop it *now* with a reason code, so
the board answers locally while it still has time (and a request admitted earlier that the
new one pushes past its deadline is dropped too); (3) hand queued work that this worker would
finish late (or last) to an idle peer that asks (``steal``). Times are the worker's own
monotonic clock in seconds, passed in; the board's deadline reaches us as a remaining budget
(``budget_ms``), turned into a local deadline at receive time (docs/protocol.md: clock skew).

No clock, no threads, no MQTT here: the worker (controller/offload/worker.py) feeds events in
and acts on what comes back.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Any

DEADLINE = "deadline"      # cannot finish before the deadline (or it already passed)
BUSY = "busy"              # the bounded queue is full


@dataclass(frozen=True, order=True)
class Task:
    """One admitted request. ``deadline``: local monotonic seconds; ``item``: the worker's payload."""

    deadline: float
    seq: int
    key: str = field(compare=False)
    arrived: float = field(compare=False)
    item: Any = field(compare=False, default=None)


@dataclass(frozen=True)
class Drop:
    task: Task
    code: str
    reason: str


class ServiceEstimate:
    """EWMA of the service time and of its absolute deviation (ms); ``tail`` = mean + k·dev."""

    def __init__(self, initial_ms: float = 5.0, alpha: float = 0.25, k: float = 2.0) -> None:
        self.mean = initial_ms
        self.dev = initial_ms / 4
        self.alpha, self.k = alpha, k
        self.samples = 0

    def observe(self, ms: float) -> None:
        if ms < 0:
            return
        if self.samples == 0:
            self.mean, self.dev = ms, ms / 4
        else:
            self.dev += self.alpha * (abs(ms - self.mean) - self.dev)
            self.mean += self.alpha * (ms - self.mean)
        self.samples += 1

    @property
    def tail(self) -> float:
        return self.mean + self.k * self.dev


class EdfScheduler:
    """Bounded EDF queue with admission control, hopeless-task dropping and steal selection.

    ``reply_ms``: time kept for the answer to travel back before the board's deadline."""

    def __init__(self, capacity: int = 64, service: ServiceEstimate | None = None, reply_ms: float = 2.0) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self.service = service or ServiceEstimate()
        self.reply_ms = reply_ms
        self.queue: list[Task] = []          # sorted by (deadline, seq)
        self.busy_until: float | None = None  # expected end of the task being served
        self._seq = itertools.count()

    # -- inputs ------------------------------------------------------------------
    def offer(self, key: str, deadline: float, now: float, item: Any = None) -> list[Drop]:
        """Admit a request (or not). Returns what to drop at once: the request itself when it
        cannot make it, or queued ones it pushes past their deadlines (never both)."""
        t = Task(deadline, next(self._seq), key, now, item)
        s = self.service.mean / 1000.0
        if deadline - self.reply_ms / 1000.0 < now + s:
            return [Drop(t, DEADLINE, "the deadline leaves less than one service time")]
        pos = bisect.bisect(self.queue, t)
        finish = self._start(now) + s * (pos + 1)
        if finish > deadline - self.reply_ms / 1000.0:
            return [Drop(t, DEADLINE, f"queue of {len(self.queue)}: would finish "
                                      f"{(finish - deadline) * 1000 + self.reply_ms:.1f} ms late")]
        if len(self.queue) >= self.capacity:
            return [Drop(t, BUSY, f"queue full ({self.capacity})")]
        self.queue.insert(pos, t)
        return self._sweep_after(pos + 1, now)

    def next(self, now: float) -> tuple[Task | None, list[Drop]]:
        """The task to serve now (earliest deadline that can still finish), and the hopeless ones
        met on the way."""
        drops: list[Drop] = []
        s = self.service.mean / 1000.0
        while self.queue:
            t = self.queue.pop(0)
            if now + s <= t.deadline - self.reply_ms / 1000.0:
                self.busy_until = now + s
                return t, drops
            drops.append(Drop(t, DEADLINE, "waited past the point where it could finish in time"))
        self.busy_until = None
        return None, drops

    def done(self, service_ms: float) -> None:
        self.service.observe(service_ms)
        self.busy_until = None

    def sweep(self, now: float) -> list[Drop]:
        """Drop every queued task that can no longer finish (time passed, or service slowed)."""
        return self._sweep_after(0, now)

    def steal(self, n: int, thief_service_ms: float, transfer_ms: float, now: float) -> list[Task]:
        """Up to ``n`` queued tasks for an idle peer: taken from the back (latest start here),
        only those the thief can finish in time, and never the one this worker serves next (when
        it is serving one, the head of the queue may go too)."""
        out: list[Task] = []
        need = (transfer_ms + thief_service_ms + self.reply_ms) / 1000.0
        i = len(self.queue) - 1
        first = 0 if self.busy_until is not None else 1
        while i >= first and len(out) < n:
            t = self.queue[i]
            if now + need <= t.deadline:
                out.append(self.queue.pop(i))
            i -= 1
        return out

    # -- estimates -----------------------------------------------------------------
    def queue_ms(self, now: float) -> float:
        """Expected wait before a new request (far deadline) starts: what runs + what is queued."""
        return max(0.0, (self._start(now) - now) * 1000.0) + len(self.queue) * self.service.mean

    def __len__(self) -> int:
        return len(self.queue)

    def _start(self, now: float) -> float:
        return max(now, self.busy_until) if self.busy_until is not None else now

    def _sweep_after(self, first: int, now: float) -> list[Drop]:
        s = self.service.mean / 1000.0
        t_free = self._start(now) + s * first
        keep, drops = self.queue[:first], []
        for t in self.queue[first:]:
            if t_free + s > t.deadline - self.reply_ms / 1000.0:
                drops.append(Drop(t, DEADLINE, "pushed past its deadline by earlier-deadline work"))
            else:
                keep.append(t)
                t_free += s
        self.queue = keep
        return drops
