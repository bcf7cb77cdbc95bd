"""Ping systemd's watchdog only while the agent's event loop is alive.

The event loop records a heartbeat (``beat``) from a task every ``interval``; a separate
thread sends ``WATCHDOG=1`` only if the last beat is fresh. If the loop is stuck (a
blocking call, a deadlock), beats stop, pings stop, and systemd restarts the agent. The
pinger must be a thread: a task on the stuck loop could not notice the loop is stuck.
"""
from __future__ import annotations

import asyncio
import threading
import time

from .sdnotify import Notifier


class LoopWatchdog:
    def __init__(self, notifier: Notifier, interval: float, stale_after: float | None = None) -> None:
        self.notifier = notifier
        self.interval = interval
        self.stale_after = stale_after if stale_after is not None else interval * 3
        self.last_beat = time.monotonic()
        self.pings = 0
        self.withheld = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        self.last_beat = time.monotonic()

    def fresh(self, now: float | None = None) -> bool:
        return ((now if now is not None else time.monotonic()) - self.last_beat) <= self.stale_after

    async def heartbeat(self) -> None:
        while True:
            self.beat()
            await asyncio.sleep(self.interval / 2)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.fresh():
                if self.notifier.watchdog():
                    self.pings += 1
            else:
                self.withheld += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(2)
