"""Fixtures of the pty tests: real pseudo-terminals, the real model answering sensor frames."""
from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.serial import Pty


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
