"""Parts for the pty tests: a real pseudo-terminal pair, the bridge's run loop, the real model."""
from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from pathlib import Path

TFLITE = Path(__file__).resolve().parents[1] / "models" / "digits_int8.tflite"


class Pty:
    """A real pty pair; the test keeps the master (the MCU's end), the bridge opens ``name``."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        tty.setraw(slave)
        self.name = os.ttyname(slave)
        os.close(slave)  # the bridge opens its own; a held slave would hide an unplug from it

    def close(self) -> None:
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


@contextlib.asynccontextmanager
async def running(bridge):
    """The bridge's run() as a task for the body of the block, stopped (and awaited) after it."""
    stop = asyncio.Event()
    task = asyncio.create_task(bridge.run(stop))
    try:
        yield bridge
    finally:
        stop.set()
        await task


def run_with(sim, main):
    """``asyncio.run(main())``, the simulator stopped whatever happens."""
    try:
        return asyncio.run(main())
    finally:
        sim.stop()


def accuracy(replies, y) -> float:
    scored = [r for r in replies if r["sample"] is not None]
    return sum(r["label"] == int(y[r["sample"]]) for r in scored) / max(1, len(scored))
