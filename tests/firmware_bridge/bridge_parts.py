"""Shared parts for the pty tests: a real pseudo-terminal, the real model, polling on the loop.

Not a conftest.py: a second module named ``conftest`` would shadow tests/conftest.py for the
modules that ``from conftest import ...``. Test modules import the fixtures they use from here.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import time
import tty
from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture
def pty():
    made: list[Pty] = []

    def make() -> Pty:
        made.append(Pty())
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="session")
def engine(example_bundle):
    from agent.serving.inference import InferenceEngine
    from protocol.bundle import load_bundle

    return InferenceEngine(load_bundle(example_bundle[0]))


@pytest.fixture
def answer(engine):
    """The bridge's sensor handler: the real int8 model's label and confidence."""
    def on_frame(mcu, msg):
        p = engine.predict(np.asarray(msg.fields["samples"], np.float32))
        return p.label, p.confidence

    return on_frame


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


async def until(pred, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def accuracy(replies, y) -> float:
    scored = [r for r in replies if r["sample"] is not None]
    return sum(r["label"] == int(y[r["sample"]]) for r in scored) / max(1, len(scored))
