"""A token bucket: at most ``rate`` events per second on average, ``burst`` at once.

Used wherever something at the edge could flood the broker or the outbox: streamed results
(``agent.results``), an MCU in a reset loop or logging at line rate (``agent.mcu``). The
caller passes the time, so the tests need no clock.
"""
from __future__ import annotations


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self.tokens = float(burst)
        self.t: float | None = None     # the first call starts the clock

    def allow(self, now: float) -> bool:
        if self.t is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False
