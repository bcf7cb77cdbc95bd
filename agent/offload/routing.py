"""Which offload worker, if any, can answer this request before its deadline (pure).

The board keeps one view per worker from two sources: the worker's retained ``offload.status``
(what it accepts, its queue estimate and service time; cleared by the broker when the worker
dies) and the board's own measurements (each reply's round trip split into network, queue
wait and service). Expected completion for a new request on worker *w*::

    net(w) + k·dev_net(w)  +  max(queue estimate reported by w (aged), in-flight to w × service(w))
                           +  service(w) + dev_service(w)

A worker slowed 5× shows it in the next replies' ``service_ms`` (and in its status), so the
board moves away within a few requests; two timeouts in a row bench the worker for ``fail_s``
(a dead worker's status is cleared by its will anyway); a late or dropped reply still teaches
its latency. With no new sample, a worker's network estimate ages back toward the best seen
(half-life ``age_s``), so one bad moment does not keep a worker avoided for ever. ``choose`` returns the worker with the earliest
expected completion that fits the time left, or None and why (the board answers locally).
Compatibility (cascade workers): raw input only to workers that accept raw with the same input
size; features only to workers that list the board's split hash.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


class Ewma:
    """Mean and mean absolute deviation, exponentially weighted."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self.mean: float | None = None
        self.dev = 0.0

    def observe(self, x: float) -> None:
        if self.mean is None:
            self.mean, self.dev = x, x / 4
        else:
            self.dev += self.alpha * (abs(x - self.mean) - self.dev)
            self.mean += self.alpha * (x - self.mean)


@dataclass
class WorkerView:
    id: str
    topic: str
    accepts: Mapping[str, Any]
    seen: float                      # when the last status arrived (board's monotonic clock)
    queue_ms: float = 0.0            # the worker's latest estimate of the wait for a new request
    queue_at: float = 0.0            # when that estimate arrived
    service: Ewma = field(default_factory=lambda: Ewma(0.5))
    net: Ewma = field(default_factory=lambda: Ewma(0.3))
    net_best: float | None = None
    net_at: float = 0.0
    inflight: int = 0
    consecutive_timeouts: int = 0
    failed_until: float = 0.0
    ok: int = 0
    dropped: int = 0
    timeouts: int = 0
    late: int = 0


@dataclass(frozen=True)
class Route:
    worker: str
    topic: str
    expected_ms: float


class WorkerRouter:
    def __init__(self, k: float = 2.0, stale_s: float = 10.0, fail_s: float = 3.0,
                 default_net_ms: float = 3.0, age_s: float = 1.0) -> None:
        self.k, self.stale_s, self.fail_s, self.default_net_ms = k, stale_s, fail_s, default_net_ms
        self.age_s = age_s
        self.workers: dict[str, WorkerView] = {}

    # -- inputs ---------------------------------------------------------------------
    def on_status(self, wid: str, body: Mapping[str, Any] | None, now: float) -> None:
        """A worker's retained status (None: cleared — the worker stopped or died)."""
        if body is None:
            self.workers.pop(wid, None)
            return
        topic, acc = body.get("topic"), body.get("accepts")
        if not isinstance(topic, str) or not isinstance(acc, Mapping):
            return                       # an old worker: reachable on the shared subscription only
        w = self.workers.get(wid)
        if w is None:
            w = self.workers[wid] = WorkerView(wid, topic, acc, now)
        w.topic, w.accepts, w.seen = topic, acc, now
        w.queue_ms, w.queue_at = float(body.get("queue_ms") or 0.0), now
        svc = body.get("service_ms")
        if isinstance(svc, (int, float)) and (w.service.mean is None or w.ok == 0 or svc > w.service.mean):
            # the worker's own estimate wins when we have none, or when it says it got slower
            w.service.observe(float(svc))

    def on_sent(self, wid: str) -> None:
        if (w := self.workers.get(wid)) is not None:
            w.inflight += 1

    def on_reply(self, wid: str, rtt_ms: float, body: Mapping[str, Any], now: float, late: bool = False) -> None:
        """An answer (or an at-once drop) from ``wid`` ``rtt_ms`` after it was sent."""
        sent = self.workers.get(wid)
        if sent is not None and not late:
            sent.inflight = max(0, sent.inflight - 1)
        # stolen work is answered by the thief: its latency belongs to the thief's view
        by = body.get("worker")
        w = self.workers.get(by) if isinstance(by, str) and by != wid else sent
        if w is None:
            return
        svc = float(body.get("service_ms") or 0.0)
        wait = float(body.get("wait_ms") or 0.0)
        if body.get("ok"):
            w.service.observe(svc)
            w.ok += 1
        elif not late:
            w.dropped += 1
        if late:
            w.late += 1
        else:
            w.consecutive_timeouts = 0
        net = max(0.0, rtt_ms - svc - wait)
        w.net.observe(net)
        w.net_best = net if w.net_best is None else min(w.net_best, net)
        w.net_at = now
        if isinstance(body.get("queue_ms"), (int, float)):
            w.queue_ms, w.queue_at = float(body["queue_ms"]), now

    def on_timeout(self, wid: str, now: float) -> None:
        w = self.workers.get(wid)
        if w is None:
            return
        w.inflight = max(0, w.inflight - 1)
        w.timeouts += 1
        w.consecutive_timeouts += 1
        if w.consecutive_timeouts >= 2:
            w.failed_until = now + self.fail_s

    # -- decisions --------------------------------------------------------------------
    def known(self, now: float) -> bool:
        return any(now - w.seen <= self.stale_s for w in self.workers.values())

    def expected_ms(self, wid: str, now: float) -> float:
        w = self.workers[wid]
        if w.net.mean is None or w.net_best is None:
            net = self.default_net_ms
        else:
            f = 0.5 ** (max(0.0, now - w.net_at) / self.age_s)
            net = w.net_best + (w.net.mean - w.net_best) * f + self.k * w.net.dev * f
        svc = w.service.mean if w.service.mean is not None else 5.0
        svc_tail = svc + w.service.dev
        reported = max(0.0, w.queue_ms - (now - w.queue_at) * 1000.0)
        return net + max(reported, w.inflight * svc) + svc_tail

    def compatible(self, w: WorkerView, mode: str, split: str | None, input_size: int | None) -> bool:
        acc = w.accepts
        if mode == "features":
            return split is not None and split in (acc.get("splits") or [])
        if not acc.get("raw"):
            return False
        shape = acc.get("input_shape")
        if input_size is None or not isinstance(shape, list):
            return True
        n = 1
        for d in shape[1:]:
            n *= int(d) if d else 1
        return n == input_size

    def choose(self, mode: str, split: str | None, input_size: int | None, remaining_ms: float,
               now: float) -> tuple[Route | None, str]:
        best: Route | None = None
        fresh = [w for w in self.workers.values() if now - w.seen <= self.stale_s]
        ok = [w for w in fresh if self.compatible(w, mode, split, input_size)]
        if not ok:
            return None, f"no worker accepts {mode} input" + (" of this split" if mode == "features" else "")
        up = [w for w in ok if now >= w.failed_until]
        if not up:
            return None, "every compatible worker timed out recently"
        for w in up:
            e = self.expected_ms(w.id, now)
            if best is None or e < best.expected_ms:
                best = Route(w.id, w.topic, e)
        assert best is not None
        if best.expected_ms > remaining_ms:
            return None, f"best worker {best.worker} ~{best.expected_ms:.1f} ms would miss the deadline " \
                         f"({remaining_ms:.1f} ms left)"
        return best, f"worker {best.worker} ~{best.expected_ms:.1f} ms fits"

    def summary(self, now: float) -> dict[str, Any]:
        out = {}
        for w in self.workers.values():
            out[w.id] = {"expected_ms": round(self.expected_ms(w.id, now), 3),
                         "net_ms": None if w.net.mean is None else round(w.net.mean, 3),
                         "service_ms": None if w.service.mean is None else round(w.service.mean, 3),
                         "queue_ms": round(w.queue_ms, 3), "inflight": w.inflight, "ok": w.ok,
                         "dropped": w.dropped, "timeouts": w.timeouts, "late": w.late,
                         "benched": now < w.failed_until}
        return out
