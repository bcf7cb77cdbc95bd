"""A bounded ring of the daemon's own log records: a ``logging.Handler``.

Records are kept as small dicts (time, level, logger, message), the oldest dropped first when
the ring is full (counted in ``evicted``). ``since()`` answers a request; ``listen()`` hands
each new record to a follower — from whatever thread logged it (paho's network thread logs
too), so the callback must be thread-safe (the feature uses ``call_soon_threadsafe``).
"""
from __future__ import annotations

import collections
import logging
import weakref
from typing import Any, Callable

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL}
MAX_MESSAGE_CHARS = 2000


def level_no(name: str | int | None) -> int:
    if name is None or name == "":
        return 0
    if isinstance(name, int):
        return name
    n = LEVELS.get(str(name).lower())
    if n is None:
        raise ValueError(f"level {name!r} is not one of {', '.join(LEVELS)}")
    return n


class LogRing(logging.Handler):
    def __init__(self, capacity: int = 2000, exclude: tuple[str, ...] = ()) -> None:
        super().__init__(logging.DEBUG)
        self.capacity = capacity
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self.seq = 0
        self.evicted = 0
        self.exclude = exclude
        self._listener: "weakref.WeakMethod | None" = None
        #: the feature that owns the ring; a ring whose owner is gone is taken off the root logger
        self.owner: "weakref.ref | None" = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(self.exclude):
            return
        try:
            msg = record.getMessage()
            if record.exc_info and record.exc_info[0] is not None:
                msg += f" [{record.exc_info[0].__name__}: {record.exc_info[1]}]"
        except Exception:  # noqa: BLE001 - a bad format string must not break logging
            msg = str(record.msg)
        self.seq += 1
        rec = {"seq": self.seq, "ts": round(record.created, 3), "level": record.levelname.lower(),
               "levelno": record.levelno, "logger": record.name, "msg": msg[:MAX_MESSAGE_CHARS]}
        if len(self.records) == self.capacity:
            self.evicted += 1
        self.records.append(rec)
        ref = self._listener
        fn = ref() if ref is not None else None
        if fn is not None:
            fn(rec)

    def since(self, ts: float = 0.0, min_level: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """The newest ``limit`` records at/after ``ts`` and at/above ``min_level``, oldest first."""
        with self.lock or _nolock():
            hits = [r for r in self.records if r["ts"] >= ts and r["levelno"] >= min_level]
        return hits[-limit:] if limit else hits

    def listen(self, fn: Callable[[dict[str, Any]], None] | None) -> None:
        """``fn`` (a bound method, held weakly) gets each new record."""
        self._listener = weakref.WeakMethod(fn) if fn is not None else None  # type: ignore[arg-type]


def attach(ring: LogRing, owner: object, logger: logging.Logger | None = None) -> None:
    """Put ``ring`` on the root logger, dropping rings of owners that no longer exist (agents
    made and dropped in one process, as tests do)."""
    lg = logger or logging.getLogger()
    for h in list(lg.handlers):
        if isinstance(h, LogRing) and h.owner is not None and h.owner() is None:
            lg.removeHandler(h)
    ring.owner = weakref.ref(owner)
    lg.addHandler(ring)


class _nolock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
