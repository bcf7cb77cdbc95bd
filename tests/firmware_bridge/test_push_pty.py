"""Model push over a real pty to the simulator, with corruption both ways, NACKs and an MCU reset."""
import asyncio

from firmware_bridge.bridge import Bridge, BridgeConfig
from firmware_bridge.simulator import Faults, MCUSimulator
from tests.helpers.serial import TFLITE, accuracy, run_with, running
from tests.helpers.waiting import until


async def with_bridge(pty_name, answer, body, **cfg):
    async with running(Bridge(BridgeConfig(port=pty_name, **cfg), answer)) as b:
        return await body(b)


def test_push_completes_through_retransmits_on_a_corrupting_line(pty, answer, digits_test):
    x, y = digits_test
    blob = TFLITE.read_bytes()
    p = pty()
    # faults that hit for certain, whatever the timing: chunks 3, 11 and 19 are NACKed once (a failed
    # flash write), the first ACKs of chunks 5, 13 and 21 and the MCU's reads 2, 9 and 16 of the
    # transfer get a bit flipped (lost ACKs, lost chunks or replies); each costs at most one resend
    faults = Faults(nack_chunks=frozenset({3, 11, 19}), corrupt_acks=frozenset({5, 13, 21}),
                    rx_bitflip_reads=frozenset({2, 9, 16}))
    sim = MCUSimulator(p.master, "mcu-push", x[:50], rate_hz=100, faults=faults).start()

    async def body(b):
        await until(lambda: b.mcu, what="HELLO")
        replies_before = len(sim.state.replies)
        res = await b.push(blob, chunk_size=512, ack_timeout_s=0.1, end_timeout_s=0.5, retries=8)
        return res, replies_before, b

    res, replies_before, b = run_with(sim, lambda: with_bridge(p.name, answer, body))
    assert res.ok, res
    assert sim.state.model == blob and res.size == len(blob) and res.chunks == 24
    assert res.retransmits >= 6 and sim.state.nacks == 3        # the faults really hit the transfer
    assert sum(b.link.dropped.values()) >= 3 and sim.link.dropped  # corrupt frames, both directions
    assert len(sim.state.replies) > replies_before                 # inference went on during the push
    assert accuracy(sim.state.replies, y) >= 0.85
    assert b.counters["pushes_ok"] == 1


def test_mcu_reset_during_a_push_fails_it_with_the_reason_and_the_next_push_succeeds(pty, answer, digits_test):
    x, y = digits_test
    blob = TFLITE.read_bytes()
    p = pty()
    sim = MCUSimulator(p.master, "mcu-reset", x[:50], rate_hz=100).start()

    async def body(b):
        await until(lambda: b.mcu, what="HELLO")
        hellos = b.counters["hellos"]
        sim.receiver.fail_chunk = lambda i: i == 5 and sim.reset()   # the MCU restarts on chunk 5
        failed = await b.push(blob, chunk_size=128)
        sim.receiver.fail_chunk = lambda i: False
        await until(lambda: b.counters["hellos"] > hellos, what="the HELLO after the reset")
        replies = len(sim.state.replies)
        ok = await b.push(blob, chunk_size=128)
        await until(lambda: len(sim.state.replies) > replies + 10, what="replies after the reset")
        return failed, ok, b

    failed, ok, b = run_with(sim, lambda: with_bridge(p.name, answer, body))
    assert not failed.ok and failed.reason == "mcu_reset" and failed.transfer_id != ok.transfer_id
    assert ok.ok and sim.state.model == blob and sim.state.resets == 1
    assert b.mcu["device_id"] == "mcu-reset"
    assert not b.link.dropped.get("duplicate") and not b.link.dropped.get("seq_gap")  # a reset is not a gap
    assert accuracy(sim.state.replies, y) >= 0.95
    assert b.counters["pushes_ok"] == 1 and b.counters["pushes_failed"] == 1


def test_push_is_refused_without_an_mcu_while_busy_and_without_space(pty, answer, digits_test):
    x, _ = digits_test
    lonely, small = pty(), pty()

    async def no_mcu(b):
        return await b.push(b"model")

    res = asyncio.run(with_bridge(lonely.name, answer, no_mcu))
    assert not res.ok and res.reason == "no_mcu"
    sim = MCUSimulator(small.master, "mcu-small", x[:5], rate_hz=50, flash_bytes=4096).start()

    async def tiny(b):
        await until(lambda: b.mcu, what="HELLO")
        first = asyncio.create_task(b.push(b"\x01" * 3000, chunk_size=64))
        await asyncio.sleep(0)
        busy = await b.push(b"\x02" * 10)
        return busy, await first, await b.push(b"\x03" * 5000)

    busy, fits, too_big = run_with(sim, lambda: with_bridge(small.name, answer, tiny))
    assert busy.reason == "busy" and fits.ok and sim.state.model == b"\x01" * 3000
    assert not too_big.ok and too_big.reason == "no_space"
