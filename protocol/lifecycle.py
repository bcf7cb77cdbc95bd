"""One lifecycle for every long-running entry point (uvicorn's shape).

signals → stop event → the main coroutine returns within its own bounded shutdown → whatever
is left is cancelled. Signal handlers only set the stop event; a second SIGINT/SIGTERM forces
the process out at once (exit 128 + signal number), so an operator is never stuck behind a
shutdown that hangs.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Awaitable, Callable, TypeVar

T = TypeVar("T")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Installs the handlers on the running loop; ``stop`` is set by the first signal."""

    def __init__(self, stop: asyncio.Event, logger: logging.Logger | None = None,
                 force_exit: Callable[[int], None] = os._exit) -> None:
        self.stop = stop
        self.hits = 0
        self.log = logger or logging.getLogger("edgefleet")
        self._force_exit = force_exit
        self._loop: asyncio.AbstractEventLoop | None = None

    def on_signal(self, signum: int) -> None:
        self.hits += 1
        if self.hits > 1:
            self._force_exit(128 + signum)
            return
        self.log.info("signal %s: shutting down", signal.Signals(signum).name)
        self.stop.set()

    def install(self) -> "StopSignals":
        self._loop = asyncio.get_running_loop()
        for sig in SIGNALS:
            self._loop.add_signal_handler(sig, self.on_signal, sig)
        return self

    def remove(self) -> None:
        if self._loop is not None:
            for sig in SIGNALS:
                self._loop.remove_signal_handler(sig)
            self._loop = None


async def run_until_stopped(main: Callable[[asyncio.Event], Awaitable[T]], *,
                            logger: logging.Logger | None = None, seconds: float = 0.0) -> T:
    """Run ``main(stop)`` with signal handlers installed; ``seconds`` > 0 also sets ``stop`` then."""
    stop = asyncio.Event()
    signals = StopSignals(stop, logger).install()
    timer = asyncio.get_running_loop().call_later(seconds, stop.set) if seconds > 0 else None
    try:
        return await main(stop)
    finally:
        if timer is not None:
            timer.cancel()
        signals.remove()


async def cancel_tasks(tasks: "list[asyncio.Task] | tuple[asyncio.Task, ...]", timeout: float = 2.0) -> None:
    """Cancel background tasks and wait for them, at most ``timeout`` seconds."""
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
