"""Simulator → bridge → a real model → INFER_REPLY back, over a real pseudo-terminal."""
import asyncio
import itertools
import os

from firmware_bridge.bridge import Bridge, BridgeConfig
from firmware_bridge.simulator import Faults, MCUSimulator
from tests.helpers.serial import accuracy, run_with, running


def run_bridge(pty, on_frame, x, faults: Faults, seconds: float, on_event=None):
    p = pty()
    sim = MCUSimulator(p.master, "mcu-7", x[:50], rate_hz=150, faults=faults).start()
    events = []

    async def main():
        async with running(Bridge(BridgeConfig(port=p.name), on_frame, on_event or events.append)) as b:
            await asyncio.sleep(seconds)
        return b

    b = run_with(sim, main)
    return b, sim, events


def test_sensor_frames_are_answered_by_real_inference(pty, answer, digits_test):
    x, y = digits_test
    b, sim, events = run_bridge(pty, answer, x, Faults(), 2.0)
    assert b.mcu["device_id"] == "mcu-7" and sim.state.hello_acks >= 1
    replies = sim.state.replies
    assert len(replies) >= 100 and b.counters["replies"] == len(replies)
    # the answers are the model's real labels for the samples the MCU sent
    assert accuracy(replies, y) >= 0.95
    assert not b.link.dropped


def test_faulty_line_is_survived_with_counters(pty, answer, digits_test):
    x, y = digits_test
    f = Faults(bitflip=0.1, garbage=0.1, truncate=0.05, reset_every=120, seed=3)
    b, sim, events = run_bridge(pty, answer, x, f, 2.5)
    dropped = b.link.dropped
    assert sum(dropped.values()) >= 10, dropped
    assert b.counters["hellos"] >= 2          # the MCU reset and said HELLO again
    assert len(sim.state.replies) >= 100       # and the bridge kept answering
    assert accuracy(sim.state.replies, y) >= 0.85


def test_a_failing_handler_is_counted_and_the_bridge_keeps_answering(pty, answer, digits_test):
    """A bug in the consumer (here: every third frame raises, and every event) must not stop the bridge."""
    n = itertools.count()

    def flaky(mcu, msg):
        if next(n) % 3 == 0:
            raise RuntimeError("consumer bug")
        return answer(mcu, msg)

    def bad_events(e):
        raise KeyError("consumer bug")

    x, y = digits_test
    b, sim, _ = run_bridge(pty, flaky, x, Faults(), 1.5, on_event=bad_events)
    assert b.counters["handler_errors"] >= 30 and b.counters["replies"] >= 60
    assert b.mcu["device_id"] == "mcu-7"       # HELLO handled although its event handler raised
    assert accuracy(sim.state.replies, y) >= 0.95


def test_slow_inference_sheds_frames_by_policy_and_drop_oldest_answers_fresher_ones(pty, answer, digits_test):
    """Inference slower than the MCU: the queue stays at its size, drops are counted, and with
    drop_oldest the frames answered are the recent ones (with drop_newest they waited in the queue)."""
    x, _ = digits_test

    async def slow(mcu, msg):
        await asyncio.sleep(0.02)                   # 50 answers/s for 200 frames/s
        return answer(mcu, msg)

    lags = {}
    for policy in ("drop_oldest", "drop_newest"):
        p = pty()
        sim = MCUSimulator(p.master, "mcu-fast", x[:50], rate_hz=200).start()

        async def main():
            async with running(Bridge(BridgeConfig(port=p.name, queue_size=8, policy=policy), slow)) as b:
                peak = 0
                for _ in range(75):
                    await asyncio.sleep(0.02)
                    peak = max(peak, b.queue.qsize())
            return b, peak

        b, peak = run_with(sim, main)
        # bounded at its size; full (it shed frames only because it was). The 20 ms sampling of the
        # depth may miss the moment it was full on a loaded machine, so the drops prove fullness.
        assert peak <= 8 and b.counters["dropped_backpressure"] >= 50, (policy, peak, b.counters)
        assert 20 <= b.counters["replies"] <= 100
        steady = [r["lag"] for r in sim.state.replies[10:]]
        lags[policy] = sum(steady) / len(steady)
    assert lags["drop_oldest"] < lags["drop_newest"] / 2, lags


def test_a_stalled_loop_pauses_reading_instead_of_buffering_without_bound(pty, answer, digits_test):
    """The loop blocked (a slow synchronous handler) while the MCU sends as fast as the pty allows:
    the reader pauses at its cap, nothing is buffered beyond it, and answering resumes afterwards."""
    import time

    from firmware_bridge.bridge import MAX_PENDING_BYTES

    x, _ = digits_test
    stalls = iter([0.5, 0.5])

    def stalling(mcu, msg):
        time.sleep(next(stalls, 0.0))               # blocks the event loop itself
        return answer(mcu, msg)

    p = pty()
    os.set_blocking(p.master, False)                 # a full line loses the MCU's bytes, as a UART does
    sim = MCUSimulator(p.master, "mcu-flood", x[:50], rate_hz=2000).start()

    async def main():
        async with running(Bridge(BridgeConfig(port=p.name), stalling)) as b:
            peak = 0
            for _ in range(100):
                await asyncio.sleep(0.01)
                peak = max(peak, b._pending_bytes)
            replies = b.counters["replies"]
            await asyncio.sleep(0.5)
        return b, peak, b.counters["replies"] - replies

    b, peak, later = run_with(sim, main)
    assert b.counters["read_pauses"] >= 1 and peak <= 2 * MAX_PENDING_BYTES
    assert later >= 100 and b.counters["handler_errors"] == 0
