"""A streaming latency histogram: log-spaced buckets, bounded memory, quantiles in O(buckets).

HDR-style: buckets grow by ``growth`` (default 2 % wide), so any quantile is reported
within ~1 % relative error whatever the number of samples, in a fixed few KB.
"""
from __future__ import annotations

import math


class LatencyHistogram:
    def __init__(self, lo_ms: float = 0.001, hi_ms: float = 60_000.0, growth: float = 1.02) -> None:
        self.lo, self.hi, self.growth = lo_ms, hi_ms, growth
        self._log_g = math.log(growth)
        self.n_buckets = int(math.ceil(math.log(hi_ms / lo_ms) / self._log_g)) + 2
        self.counts = [0] * self.n_buckets
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def _bucket(self, v: float) -> int:
        if v <= self.lo:
            return 0
        if v >= self.hi:
            return self.n_buckets - 1
        return 1 + int(math.log(v / self.lo) / self._log_g)

    def record(self, ms: float) -> None:
        if not (ms >= 0) or math.isinf(ms):
            return
        self.counts[self._bucket(ms)] += 1
        self.count += 1
        self.total += ms
        if ms > self.max:
            self.max = ms

    def quantile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank and c:
                if i == 0:
                    return self.lo
                upper = self.lo * self.growth ** i
                return min(upper / math.sqrt(self.growth), self.max)  # bucket's geometric middle
        return self.max

    def summary(self) -> dict[str, float | int | None]:
        r = lambda v: None if v is None else round(v, 4)  # noqa: E731
        return {"count": self.count, "mean_ms": r(self.total / self.count) if self.count else None,
                "p50_ms": r(self.quantile(0.50)), "p95_ms": r(self.quantile(0.95)),
                "p99_ms": r(self.quantile(0.99)), "max_ms": r(self.max) if self.count else None}
