"""Live shadow: before a new version may serve, it answers real inputs beside the old one.

The reference and evaluation sets in a bundle were chosen when it was built; the inputs
this board sees today may differ. So, when ``model.shadow_live_samples`` > 0, the staged
version is held back while the serving model keeps answering: the next N live inputs
(with the serving model's label for each) are collected — for at most
``shadow_live_window_s`` — then the candidate runs on them, and it is refused when it
agrees on fewer labels than ``shadow_min_agreement``. Collection is a tap on the serving
path that only appends to a bounded list; the candidate runs in the installer's thread.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import numpy as np


class LiveSample:
    """Collects up to ``n`` (input, serving label) pairs from the serving path."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.items: list[tuple[np.ndarray, int]] = []
        self._full = threading.Event()
        self._lock = threading.Lock()

    def tap(self, x: Any, label: int) -> None:
        with self._lock:
            if len(self.items) < self.n:
                self.items.append((np.array(x, dtype=np.float32, copy=True), int(label)))
                if len(self.items) >= self.n:
                    self._full.set()

    def wait(self, timeout: float) -> list[tuple[np.ndarray, int]]:
        self._full.wait(timeout)
        with self._lock:
            return list(self.items)


def live_agreement(predict: Callable[[np.ndarray], int], items: list[tuple[np.ndarray, int]]) -> float | None:
    """Share of live inputs on which the candidate's label equals the serving model's (None: no inputs)."""
    if not items:
        return None
    same = sum(1 for x, label in items if predict(x) == label)
    return same / len(items)
