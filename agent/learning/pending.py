"""Features waiting for a label that arrives later (a ``feedback`` message naming the request).

Most labels on a device come after the answer: a person confirms or corrects it, a
downstream sensor settles the truth. Until then the request's *features* (not its raw
input) are kept here, bounded two ways so an unlabelled stream cannot grow memory:

* by count: past ``max_items`` the oldest entry is dropped;
* by age: an entry older than ``ttl_s`` is dropped, and a label for it is refused as expired.

Time is an input (``now``), never read from a clock, so expiry is tested without sleeping.
Not thread-safe on its own: the agent's loop thread is its only user.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Claim:
    """The outcome of ``PendingLabels.take``: the features, or why there are none."""

    features: np.ndarray | None
    reason: str | None            # None when ``features`` is set
    kind: str | None = None       # "unknown_request" | "expired" (a counter key), None when taken


class PendingLabels:
    def __init__(self, max_items: int = 2048, ttl_s: float = 600.0, max_id_len: int = 200) -> None:
        if max_items < 1:
            raise ValueError("max_items must be >= 1")
        if not ttl_s > 0:
            raise ValueError("ttl_s must be > 0")
        self.max_items, self.ttl_s, self.max_id_len = max_items, float(ttl_s), max_id_len
        self._items: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self.dropped = {"capacity": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._items

    def put(self, request_id: str, features: np.ndarray, now: float) -> None:
        """Remember ``features`` for ``request_id`` (a repeated id replaces the older entry)."""
        if not isinstance(request_id, str) or not request_id or len(request_id) > self.max_id_len:
            raise ValueError(f"request id must be a non-empty string of at most {self.max_id_len} characters")
        self._items.pop(request_id, None)
        self._items[request_id] = (np.asarray(features, np.float32).reshape(-1).copy(), float(now))
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)
            self.dropped["capacity"] += 1

    def take(self, request_id: str, now: float) -> Claim:
        """Remove and return the features for ``request_id``; refused when unknown or expired."""
        item = self._items.pop(request_id, None) if isinstance(request_id, str) else None
        if item is None:
            return Claim(None, f"unknown_request: no pending features for request {request_id!r} "
                               "(never seen, already labelled, or expired)", "unknown_request")
        feats, t = item
        if now - t > self.ttl_s:
            self.dropped["expired"] += 1
            return Claim(None, f"expired: request {request_id!r} is older than {self.ttl_s:g}s", "expired")
        return Claim(feats, None)

    def expire(self, now: float) -> int:
        """Drop every entry older than the TTL; returns how many went. Entries are in time order."""
        n = 0
        while self._items:
            _, (_, t) = next(iter(self._items.items()))
            if now - t <= self.ttl_s:
                break
            self._items.popitem(last=False)
            n += 1
        self.dropped["expired"] += n
        return n

    @property
    def nbytes(self) -> int:
        return sum(f.nbytes for f, _ in self._items.values())

    def stats(self) -> dict[str, int]:
        return {"pending": len(self._items), "bytes": self.nbytes, **{f"dropped_{k}": v for k, v in self.dropped.items()}}
