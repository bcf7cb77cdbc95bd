"""Simulator → bridge → a real model → INFER_REPLY back, over a real pseudo-terminal."""
import asyncio
import os
import tty

import numpy as np

from firmware_bridge.bridge import Bridge, BridgeConfig
from firmware_bridge.simulator import Faults, MCUSimulator


def run_bridge(faults: Faults, seconds: float, example_bundle, digits_test):
    from agent.inference import InferenceEngine
    from protocol.bundle import load_bundle

    eng = InferenceEngine(load_bundle(example_bundle[0]))
    x, y = digits_test
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    name = os.ttyname(slave)
    sim = MCUSimulator(master, "mcu-7", x[:50], rate_hz=150, faults=faults).start()
    events = []

    def on_frame(mcu, msg):
        p = eng.predict(np.asarray(msg.fields["samples"], np.float32))
        return p.label, p.confidence

    async def main():
        b = Bridge(BridgeConfig(port=name), on_frame, events.append)
        stop = asyncio.Event()
        t = asyncio.create_task(b.run(stop))
        await asyncio.sleep(seconds)
        stop.set()
        await t
        return b

    try:
        b = asyncio.run(main())
    finally:
        sim.stop()
        os.close(master)
        os.close(slave)
    return b, sim, events, y[:50]


def test_sensor_frames_are_answered_by_real_inference(example_bundle, digits_test):
    b, sim, events, y = run_bridge(Faults(), 2.0, example_bundle, digits_test)
    assert b.mcu["device_id"] == "mcu-7" and sim.state.hello_acks >= 1
    replies = sim.state.replies
    assert len(replies) >= 100 and b.counters["replies"] == len(replies)
    # the answers are the model's real labels for the samples the MCU sent
    right = sum(r["label"] == int(y[r["sample"]]) for r in replies if r["sample"] is not None)
    assert right / len(replies) >= 0.95
    assert not b.link.dropped


def test_faulty_line_is_survived_with_counters(example_bundle, digits_test):
    f = Faults(bitflip=0.1, garbage=0.1, truncate=0.05, reset_every=120, seed=3)
    b, sim, events, y = run_bridge(f, 2.5, example_bundle, digits_test)
    dropped = b.link.dropped
    assert sum(dropped.values()) >= 10, dropped
    assert b.counters["hellos"] >= 2          # the MCU reset and said HELLO again
    assert len(sim.state.replies) >= 100       # and the bridge kept answering
    right = sum(r["label"] == int(y[r["sample"]]) for r in sim.state.replies if r["sample"] is not None)
    assert right / len(sim.state.replies) >= 0.85


def test_a_failing_handler_is_counted_and_the_bridge_keeps_answering(example_bundle, digits_test):
    """A bug in the consumer (here: every third frame raises) must not stop the bridge."""
    import itertools

    from agent.inference import InferenceEngine
    from protocol.bundle import load_bundle

    eng = InferenceEngine(load_bundle(example_bundle[0]))
    n = itertools.count()

    def flaky(mcu, msg):
        if next(n) % 3 == 0:
            raise RuntimeError("consumer bug")
        p = eng.predict(np.asarray(msg.fields["samples"], np.float32))
        return p.label, p.confidence

    def bad_events(e):
        raise KeyError("consumer bug")

    x, y = digits_test
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    sim = MCUSimulator(master, "mcu-flaky", x[:50], rate_hz=150).start()

    async def main():
        b = Bridge(BridgeConfig(port=os.ttyname(slave)), flaky, bad_events)
        stop = asyncio.Event()
        t = asyncio.create_task(b.run(stop))
        await asyncio.sleep(1.5)
        stop.set()
        await t
        return b

    try:
        b = asyncio.run(main())
    finally:
        sim.stop()
        os.close(master)
        os.close(slave)
    assert b.counters["handler_errors"] >= 30 and b.counters["replies"] >= 60
    assert b.mcu["device_id"] == "mcu-flaky"       # HELLO handled although its event handler raised
