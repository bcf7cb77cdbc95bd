"""Unplug/replug and MCU resets over real pseudo-terminals.

The bridge opens a stable name (a symlink, as udev's /dev/serial/by-id/... is); unplugging closes
the pty master under it and removes the link (a freed /dev/pts/N may be reused by any process),
replugging makes a new pty and points the name at it.
"""
import asyncio
import os

from firmware_bridge.bridge import Bridge, BridgeConfig
from firmware_bridge.simulator import MCUSimulator
from tests.helpers.serial import accuracy, run_with, running
from tests.helpers.waiting import until


def point(link_path, target):
    tmp = f"{link_path}.new"
    os.symlink(target, tmp)
    os.replace(tmp, link_path)


def test_unplug_replug_reopens_with_backoff_and_the_mcu_says_hello_again(tmp_path, pty, answer, digits_test):
    x, y = digits_test
    port = str(tmp_path / "ttyMCU")
    first = pty()
    point(port, first.name)
    sim = MCUSimulator(first.master, "mcu-plug", x[:50], rate_hz=100).start()
    events = []

    async def main():
        async with running(Bridge(BridgeConfig(port=port, min_backoff_s=0.05, max_backoff_s=0.4), answer,
                                  events.append)) as b:
            await until(lambda: len(sim.state.replies) >= 20, what="replies before the unplug")
            sim.detach()
            first.close()                                       # unplug: the device goes,
            os.unlink(port)                                     # and udev removes its by-id link
            await until(lambda: b.counters["reopens"] >= 1, what="the bridge noticing the unplug")
            await asyncio.sleep(1.0)                            # stays unplugged: reopen attempts fail
            assert b.counters["opens"] == 1 and not b.stats()["connected"]
            replies = len(sim.state.replies)
            asks = sim.state.hello_requests
            second = pty()
            point(port, second.name)                            # replug (the MCU did not reset)
            sim.attach(second.master)
            await until(lambda: b.counters["opens"] == 2, timeout=3, what="the reopen")
            await until(lambda: sim.state.hello_requests > asks and b.counters["hellos"] >= 2,
                        what="bridge HELLO answered by the MCU's HELLO")
            await until(lambda: len(sim.state.replies) >= replies + 20, what="replies after the replug")
        return b

    b = run_with(sim, main)
    assert sim.state.resets == 0 and b.mcu["device_id"] == "mcu-plug"
    assert any(e["event"] == "mcu.port_lost" for e in events)
    assert [e["event"] for e in events].count("mcu.hello") >= 2
    assert sim.state.tx_lost > 0                                # it talked to nobody while unplugged
    assert accuracy(sim.state.replies, y) >= 0.95


def test_reader_backs_off_while_the_port_is_missing(tmp_path, answer):
    """No port at all: a few open attempts per second at most, and the bridge still stops at once."""
    async def main():
        async with running(Bridge(BridgeConfig(port=str(tmp_path / "nothing"), min_backoff_s=0.05,
                                               max_backoff_s=0.2), answer)) as b:
            await asyncio.sleep(1.2)
            t0 = asyncio.get_running_loop().time()
        return b, asyncio.get_running_loop().time() - t0

    b, stop_s = asyncio.run(main())
    assert b.counters["opens"] == 0 and b.mcu is None and stop_s < 0.5
    assert 3 <= b.counters["open_failures"] <= 15   # 0.05 s doubling to 0.2 s, jittered: not a busy loop


def test_mcu_reset_says_hello_again_and_frames_keep_being_answered(pty, answer, digits_test):
    x, y = digits_test
    p = pty()
    sim = MCUSimulator(p.master, "mcu-boot", x[:50], rate_hz=100).start()
    events = []

    async def main():
        async with running(Bridge(BridgeConfig(port=p.name), answer, events.append)) as b:
            await until(lambda: len(sim.state.replies) >= 20, what="replies before the reset")
            for n in range(3):
                hellos, replies = b.counters["hellos"], len(sim.state.replies)
                sim.reset()
                await until(lambda: b.counters["hellos"] > hellos, what=f"HELLO after reset {n}")
                await until(lambda: len(sim.state.replies) >= replies + 20, what=f"replies after reset {n}")
        return b

    b = run_with(sim, main)
    assert sim.state.resets == 3 and sim.state.hello_acks >= 4
    # sequence numbers restart at a reset: that is neither a duplicate nor a gap
    assert not b.link.dropped.get("duplicate") and not b.link.dropped.get("seq_gap"), b.link.dropped
    assert accuracy(sim.state.replies, y) >= 0.95


def test_no_reply_crosses_an_mcu_restart(pty, answer, digits_test):
    """Frames queued (or in the handler) when the MCU restarts are not answered: their sequence
    numbers belong to the old session and would name other frames in the new one."""
    x, y = digits_test
    p = pty()
    sim = MCUSimulator(p.master, "mcu-slow", x[:50], rate_hz=100).start()
    hold = asyncio.Event()

    async def slow(mcu, msg):
        while hold.is_set():
            await asyncio.sleep(0.01)
        return answer(mcu, msg)

    async def main():
        async with running(Bridge(BridgeConfig(port=p.name, queue_size=8), slow)) as b:
            await until(lambda: len(sim.state.replies) >= 10, what="replies before")
            hold.set()
            await asyncio.sleep(0.3)                 # one frame held in the handler, the queue full
            hellos, replies = b.counters["hellos"], len(sim.state.replies)
            sim.reset()
            await until(lambda: b.counters["hellos"] > hellos, what="the HELLO after the reset")
            hold.clear()
            await until(lambda: len(sim.state.replies) >= replies + 20, what="replies after the reset")
        return b

    b = run_with(sim, main)
    assert b.counters["dropped_stale"] >= 9           # the held frame and the 8 queued ones
    assert all(r["sample"] is not None for r in sim.state.replies)   # every reply names a frame it was for
    assert accuracy(sim.state.replies, y) >= 0.95
