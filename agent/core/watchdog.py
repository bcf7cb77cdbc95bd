"""Ping systemd's watchdog only while the agent's event loop is alive.

The event loop records a heartbeat (``beat``): a task (``heartbeat()``) calls it every
``interval / 4``, and the main loop may call it too. A separate *thread* sends ``WATCHDOG=1``
every ``interval`` only if the last beat is younger than ``stale_after``. If the loop is stuck
(a blocking call, a deadlock, a CPU-bound step that never yields), beats stop, pings stop, and
systemd kills and restarts the agent (``Restart=on-failure`` counts a watchdog timeout as a
failure).

Why a thread, against our one-event-loop rule: a task on the stuck loop could not notice that
the loop is stuck — it would be stuck too. The thread shares exactly one float with the loop
(``last_beat``, written by the loop, read by the thread; a single attribute store is atomic in
CPython) and owns the notifier calls; it never touches loop state.

Timing: with ``interval`` = WatchdogSec/2 (``sdnotify.watchdog_interval()``) and the default
``stale_after`` = ``interval``, systemd restarts a stuck agent at most
``stale_after + WatchdogSec`` (1.5 x WatchdogSec) after its loop stopped.
"""
from __future__ import annotations

import asyncio
import threading
import time
from typing import Protocol


class _Pinger(Protocol):
    def watchdog(self) -> bool: ...

    def status(self, text: str) -> bool: ...


class LoopWatchdog:
    def __init__(self, notifier: _Pinger, interval: float, stale_after: float | None = None) -> None:
        if interval <= 0:
            raise ValueError(f"watchdog interval must be > 0, got {interval}")
        self.notifier = notifier
        self.interval = interval
        self.stale_after = stale_after if stale_after is not None else interval
        self.last_beat = time.monotonic()
        self.pings = 0          # WATCHDOG=1 sent
        self.withheld = 0       # pings skipped because the loop looked stuck
        self._stale = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Called from the event loop: 'I am still turning'."""
        self.last_beat = time.monotonic()

    def fresh(self, now: float | None = None) -> bool:
        return ((now if now is not None else time.monotonic()) - self.last_beat) <= self.stale_after

    async def heartbeat(self) -> None:
        """Run as a named task on the loop being watched."""
        while True:
            self.beat()
            await asyncio.sleep(self.interval / 4)

    def tick(self, now: float | None = None) -> bool:
        """One pinger step (the thread calls it every ``interval``): ping if fresh; True if pinged."""
        now = now if now is not None else time.monotonic()
        if self.fresh(now):
            if self._stale:
                self._stale = False
                self.notifier.status("event loop responsive again")
            if self.notifier.watchdog():
                self.pings += 1
                return True
            return False
        self.withheld += 1
        if not self._stale:
            self._stale = True
            self.notifier.status(f"event loop unresponsive for {now - self.last_beat:.1f} s; "
                                 "watchdog pings withheld")
        return False

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LoopWatchdog already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
