"""The registry writer: batches of validated messages committed on a thread, acknowledged after.

``fleetctl serve``'s loop validates each message and hands it here (``put``); this thread writes
batches through its own registry connection and commits by size (``batch_max``) or time
(``flush_s``). Only after a batch committed are its MQTT messages acknowledged (posted back to
the loop), so a crash, or a database that goes away, before that gets them again from the broker
(and message ids make the second copy a duplicate, never a second row).

Flow control, not drops: ``put`` waits while ``max_pending`` messages are not yet committed; the
loop then stops taking from the MQTT hand-off, paho stops reading, and the broker holds the rest.
When the database is unreachable the writer reconnects with backoff and retries the same batch.

The one shed policy: a message the database refuses for another reason (after its batch failed,
each message is tried alone) is counted under ``shed["store_error"]``, logged with its id, counted
as a reject, and acknowledged — retrying it forever would stop the whole fleet's ingest.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from protocol.mqttlink import Message

from .db import is_disconnect
from .registry import Registry

log = logging.getLogger("fleetctl.ingest")

Item = tuple   # (leaf, envelope) or (leaf, envelope, payload as received) to store


@dataclass(frozen=True)
class WriterSettings:
    batch_max: int = 500          # commit at most this many messages at once
    flush_s: float = 0.05         # …or this long after the first one waiting
    max_pending: int = 5000       # messages taken but not yet committed: beyond this, put() waits
    retry_min_s: float = 0.2      # reconnect backoff while the database is away
    retry_max_s: float = 5.0


class IngestWriter:
    def __init__(self, open_registry: Callable[[], Registry], on_committed: Callable[[list[Message], Any], None],
                 settings: WriterSettings = WriterSettings()) -> None:
        self._open = open_registry
        self._on_committed = on_committed
        self.s = settings
        self._cv = threading.Condition()
        self._queue: deque[tuple[Message | None, Item | None, float]] = deque()
        self._rejects: Counter[str] = Counter()
        self._meta: dict[str, Any] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = 0                  # loop side: taken, not yet committed
        self._room: asyncio.Event | None = None
        self._drained = threading.Event()
        # figures (written by the thread, read anywhere: plain ints and floats)
        self.committed = 0
        self.batches = 0
        self.duplicates = 0
        self.stored: Counter[str] = Counter()
        self.shed: Counter[str] = Counter()
        self.reconnects = 0
        self.write_ms: deque[float] = deque(maxlen=512)
        self.lag_ms: deque[float] = deque(maxlen=512)
        self.error: str | None = None

    # -- loop side ---------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._room = asyncio.Event()
        self._room.set()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="registry-writer", daemon=True)
        self._thread.start()
        ready.wait(30)
        if self.error:
            raise RuntimeError(self.error)

    @property
    def pending(self) -> int:
        return self._pending

    async def put(self, msg: Message | None, item: Item | None) -> None:
        """Queue one message (``item`` None: nothing to store, only the ack to order after what came before)."""
        assert self._room is not None
        while self._pending >= self.s.max_pending:
            self._room.clear()
            await self._room.wait()
        self._pending += 1
        with self._cv:
            self._queue.append((msg, item, time.monotonic()))
            if len(self._queue) >= self.s.batch_max or len(self._queue) == 1:
                self._cv.notify()

    def reject(self, reason: str, n: int = 1) -> None:
        """Count a reject (stored with the next batch)."""
        with self._cv:
            self._rejects[reason] += n
            self._cv.notify()

    def set_meta(self, key: str, value: Any) -> None:
        with self._cv:
            self._meta[key] = value
            self._cv.notify()

    def _done(self, msgs: list[Message], n: int, result: Any) -> None:   # on the loop
        self._pending -= n
        if self._room is not None and self._pending < self.s.max_pending:
            self._room.set()
        self._on_committed(msgs, result)

    async def stop(self, timeout: float = 10.0) -> None:
        """Commit (and acknowledge) what was queued, then end the thread."""
        if self._thread is None:
            return
        with self._cv:
            self._stop = True
            self._cv.notify()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        await asyncio.sleep(0)   # the last acknowledgements posted to the loop run now
        self._thread = None

    def figures(self) -> dict[str, Any]:
        def pct(xs: Sequence[float], q: float) -> float | None:
            s = sorted(xs)
            return round(s[min(len(s) - 1, int(q * len(s)))], 2) if s else None
        w, lag = list(self.write_ms), list(self.lag_ms)
        return {"committed": self.committed, "batches": self.batches, "duplicates": self.duplicates,
                "stored": dict(self.stored), "shed": dict(self.shed), "pending": self._pending,
                "db_reconnects": self.reconnects, "db_write_ms_p50": pct(w, 0.5), "db_write_ms_p99": pct(w, 0.99),
                "ingest_lag_ms_p50": pct(lag, 0.5), "ingest_lag_ms_p99": pct(lag, 0.99)}

    # -- writer thread -----------------------------------------------------
    def _take(self) -> tuple[list[tuple[Message | None, Item | None, float]], Counter[str], dict[str, Any]] | None:
        with self._cv:
            while not self._queue and not self._rejects and not self._meta and not self._stop:
                self._cv.wait(1.0)
            if self._queue and not self._stop:
                deadline = self._queue[0][2] + self.s.flush_s
                while len(self._queue) < self.s.batch_max and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
            if self._stop and not self._queue and not self._rejects and not self._meta:
                return None
            n = min(len(self._queue), self.s.batch_max)
            batch = [self._queue.popleft() for _ in range(n)]
            rejects, self._rejects = self._rejects, Counter()
            meta, self._meta = self._meta, {}
            return batch, rejects, meta

    def _run(self, ready: threading.Event) -> None:
        reg: Registry | None = None
        try:
            reg = self._open()
        except Exception as exc:  # noqa: BLE001 - reported to start()
            self.error = f"registry writer cannot open the registry: {exc}"
        ready.set()
        if reg is None:
            return
        while True:
            got = self._take()
            if got is None:
                break
            batch, rejects, meta = got
            reg = self._commit(reg, batch, rejects, meta)
        reg.close()

    def _commit(self, reg: Registry, batch: list, rejects: Counter[str], meta: dict[str, Any]) -> Registry:
        items = [it for _, it, _ in batch if it is not None]
        delay = self.s.retry_min_s
        while True:
            t0 = time.perf_counter()
            try:
                res = reg.write(items, dict(rejects))
                for k, v in meta.items():
                    reg.set_meta(k, v)
                reg.commit()
                break
            except Exception as exc:  # noqa: BLE001 - sorted below
                self._safe_rollback(reg)
                if is_disconnect(exc) or _sqlite_busy(exc):
                    log.warning("registry unavailable (%s): retrying the batch of %d in %.1fs",
                                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                                len(batch), delay)
                    time.sleep(delay)
                    delay = min(self.s.retry_max_s, delay * 2)
                    reg = self._reopen(reg)
                    continue
                log.exception("registry refused a batch of %d: storing them one by one", len(batch))
                res = self._one_by_one(reg, items, rejects)
                break
        now = time.monotonic()
        self.write_ms.append((time.perf_counter() - t0) * 1000)
        if batch:
            self.lag_ms.append((now - batch[0][2]) * 1000)
        self.batches += 1
        self.committed += len(batch)
        self.duplicates += res.duplicates
        self.stored.update(res.stored)
        msgs = [m for m, _, _ in batch if m is not None]
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._done, msgs, len(batch), res)
            except RuntimeError:   # the loop is closing: unacknowledged, so the broker sends them again
                pass
        return reg

    def _one_by_one(self, reg: Registry, items: list[Item], rejects: Counter[str]) -> Any:
        from .registry import WriteResult

        total = WriteResult()
        for i, item in enumerate(items):
            try:
                r = reg.write([item], dict(rejects) if i == 0 else None)
                reg.commit()
            except Exception as exc:  # noqa: BLE001 - the explicit shed policy (module docstring)
                self._safe_rollback(reg)
                self.shed["store_error"] += 1
                log.error("shed %s %s from %s: the registry refused it: %s", item[0], item[1].id, item[1].sender, exc)
                try:
                    reg.count_reject("store_error")
                    reg.commit()
                except Exception:  # noqa: BLE001
                    self._safe_rollback(reg)
                continue
            total.duplicates += r.duplicates
            for k, v in r.stored.items():
                total.stored[k] = total.stored.get(k, 0) + v
        return total

    def _reopen(self, reg: Registry) -> Registry:
        try:
            reg.close()
        except Exception:  # noqa: BLE001
            pass
        while True:
            try:
                new = self._open()
                self.reconnects += 1
                log.info("registry reconnected")
                return new
            except Exception as exc:  # noqa: BLE001 - still away
                log.warning("registry still unavailable: %s", exc)
                time.sleep(self.s.retry_max_s / 2)

    @staticmethod
    def _safe_rollback(reg: Registry) -> None:
        try:
            reg.rollback()
        except Exception:  # noqa: BLE001 - a dead connection cannot roll back: it is reopened
            pass


def _sqlite_busy(exc: BaseException) -> bool:
    import sqlite3

    return isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
