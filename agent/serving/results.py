"""What to publish for streaming inference results (pure; time is an input).

``every``: each result, at most ``max_per_s`` (excess counted, folded into the next summary).
``summary``: one message per interval with class counts, mean confidence and, where labels
are known, accuracy. ``off``: nothing.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from ..core.ratelimit import TokenBucket


class ResultsLimiter:
    def __init__(self, mode: str = "summary", interval_s: float = 10.0, max_per_s: float = 20.0) -> None:
        if mode not in ("every", "summary", "off"):
            raise ValueError(f"results mode must be every, summary or off, got {mode!r}")
        self.mode, self.interval_s, self.max_per_s = mode, interval_s, max_per_s
        self._window_start: float | None = None
        self._bucket = TokenBucket(max_per_s, max_per_s)
        self.suppressed = 0
        self._reset()

    def _reset(self) -> None:
        self.counts: Counter[str] = Counter()
        self.n = 0
        self.conf_sum = 0.0
        self.labelled = 0
        self.correct = 0
        self.paths: Counter[str] = Counter()

    def add(self, now: float, result: dict[str, Any], label: int | None = None) -> list[dict[str, Any]]:
        """Record one result; returns the messages (bodies) to publish now."""
        if self.mode == "off":
            return []
        if self._window_start is None:
            self._window_start = now
        self.n += 1
        self.counts[str(result.get("label_name") or result.get("label"))] += 1
        self.conf_sum += float(result.get("confidence", 0.0))
        self.paths[str(result.get("path", "local"))] += 1
        if label is not None:
            self.labelled += 1
            self.correct += int(label == result.get("label"))
        out: list[dict[str, Any]] = []
        if self.mode == "every":
            if self._take(now):
                out.append({"type": "result", **result, **({"label_given": label} if label is not None else {})})
            else:
                self.suppressed += 1
        out += self.tick(now)
        return out

    def _take(self, now: float) -> bool:
        return self._bucket.allow(now)

    def tick(self, now: float) -> list[dict[str, Any]]:
        """Emit the interval summary when it is due (summary mode, or suppressed results in every mode)."""
        if self._window_start is None or now - self._window_start < self.interval_s or self.n == 0:
            return []
        if self.mode == "every" and self.suppressed == 0:
            self._window_start, _ = now, self._reset()
            return []
        body: dict[str, Any] = {"type": "summary", "interval_s": round(now - self._window_start, 3), "count": self.n,
                                "class_counts": dict(self.counts), "mean_confidence": round(self.conf_sum / self.n, 5),
                                "paths": dict(self.paths)}
        if self.labelled:
            body["accuracy"] = round(self.correct / self.labelled, 5)
            body["labelled"] = self.labelled
        if self.suppressed:
            body["suppressed"] = self.suppressed
            self.suppressed = 0
        self._window_start = now
        self._reset()
        return [body]
