"""Firmware bridge: frames/s it sustains over a real pty and the latency it adds per frame.

Baseline, measured in the same run on the same kind of pty: the same frame bytes through the
pty alone — a plain thread reads them (throughput) or echoes a pre-encoded reply (latency),
with no parsing, no queue and no event loop. Figures:

* ``frames_per_s``: SENSOR_FRAMEs (64 float32 samples, as the digits model takes) written by an
  MCU-side process as fast as the pty accepts them, decoded, queued and answered (INFER_REPLY
  written back) by the bridge; ``dropped_per_s`` is what the queue policy shed meanwhile.
  ``raw_frames_per_s``: the same bytes from the same process read raw from the pty.
* ``added_latency_ms_p50/p99``: frame-in to INFER_REPLY-out round trip through the bridge minus
  the raw echo round trip (one frame in flight at a time).
* ``model_*``: the same with the real int8 digits model answering (the agent's inference path).
* ``push_kib_s``: a 64 KiB model push (512-byte chunks, stop-and-wait) to the reference receiver.

    python bench/bridge.py [--quick]

Never fails on a number; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tty
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from firmware_bridge.bridge import Bridge, BridgeConfig  # noqa: E402
from firmware_bridge.frames import MsgType  # noqa: E402
from firmware_bridge.link import Link  # noqa: E402
from firmware_bridge.push import ModelReceiver  # noqa: E402

SAMPLES = [float(i % 17) for i in range(64)]
HELLO = {"device_id": "bench-mcu", "firmware": "bench", "max_frame": 1024, "samples_per_frame": 64, "sensors": ["x"]}


def open_pty() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    name = os.ttyname(slave)
    os.close(slave)
    return master, name


def frames(n: int) -> list[bytes]:
    tx = Link()
    return [tx.send(MsgType.SENSOR_FRAME, {"timestamp_ms": i, "samples": SAMPLES}) for i in range(n)]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# The MCU side of the throughput runs is another process (as a real MCU is another chip): it writes
# pre-encoded SENSOR_FRAMEs as fast as the pty takes them and drains whatever comes back.
BLASTER = r"""
import os, sys, threading
sys.path.insert(0, sys.argv[2])
from firmware_bridge.frames import MsgType
from firmware_bridge.link import Link
fd = int(sys.argv[1])
tx = Link()
samples = [float(i % 17) for i in range(64)]
block = b"".join(tx.send(MsgType.SENSOR_FRAME, {"timestamp_ms": i, "samples": samples}) for i in range(4096))
def drain():
    while True:
        try:
            os.read(fd, 65536)
        except OSError:
            pass
threading.Thread(target=drain, daemon=True).start()
while True:
    try:
        os.write(fd, block)
    except OSError:
        pass
"""


def start_blaster(master: int) -> subprocess.Popen:
    root = str(Path(__file__).resolve().parents[1])
    return subprocess.Popen([sys.executable, "-c", BLASTER, str(master), root], pass_fds=[master])


# -- baseline: the pty alone -------------------------------------------------------------
def raw_throughput(seconds: float) -> float:
    master, name = open_pty()
    slave = os.open(name, os.O_RDWR | os.O_NOCTTY)
    child = start_blaster(master)
    frame_len = len(frames(1)[0])
    try:
        t_end = time.perf_counter() + 0.3
        while time.perf_counter() < t_end:            # warm-up
            os.read(slave, 65536)
        got, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            got += len(os.read(slave, 65536))
        return got / frame_len / (time.perf_counter() - t0)
    finally:
        child.kill()
        child.wait()
        os.close(slave)
        os.close(master)


def raw_latency(n: int) -> list[float]:
    master, name = open_pty()
    slave = os.open(name, os.O_RDWR | os.O_NOCTTY)
    frame = frames(1)[0]
    reply = Link().send(MsgType.INFER_REPLY, {"ref_seq": 0, "label": 3, "confidence": 0.9})
    stop = threading.Event()

    def echo() -> None:
        buf = 0
        while not stop.is_set():
            r, _, _ = select.select([slave], [], [], 0.05)
            if r:
                buf += len(os.read(slave, 65536))
                while buf >= len(frame):
                    buf -= len(frame)
                    os.write(slave, reply)

    t = threading.Thread(target=echo, daemon=True)
    t.start()
    rtts = []
    for _ in range(n):
        t0 = time.perf_counter()
        os.write(master, frame)
        got = 0
        while got < len(reply):
            got += len(os.read(master, 4096))
        rtts.append((time.perf_counter() - t0) * 1000)
    stop.set()
    t.join(1)
    os.close(slave)
    os.close(master)
    return rtts


# -- through the bridge ------------------------------------------------------------------
async def with_bridge(handler: Callable, body: Callable, master: int, name: str) -> Any:
    b = Bridge(BridgeConfig(port=name), handler)
    stop = asyncio.Event()
    task = asyncio.create_task(b.run(stop))
    try:
        while b.counters["opens"] == 0:
            await asyncio.sleep(0.01)
        return await body(b)
    finally:
        stop.set()
        await task


async def bridge_throughput(handler: Callable, seconds: float) -> dict[str, float]:
    master, name = open_pty()

    async def body(b: Bridge) -> dict[str, float]:
        child = start_blaster(master)
        try:
            await asyncio.sleep(0.3)                      # warm-up
            n0, d0, t0 = b.counters["replies"], b.counters["dropped_backpressure"], time.perf_counter()
            await asyncio.sleep(seconds)
            n1, d1, t1 = b.counters["replies"], b.counters["dropped_backpressure"], time.perf_counter()
        finally:
            child.kill()
            child.wait()
        drops = {k: v for k, v in b.link.dropped.items() if k != "seq_gap"}  # the blaster's block repeats
        return {"frames_per_s": (n1 - n0) / (t1 - t0), "dropped_per_s": (d1 - d0) / (t1 - t0),
                "link_drops": sum(drops.values()), "read_pauses": b.counters["read_pauses"]}

    try:
        return await with_bridge(handler, body, master, name)
    finally:
        os.close(master)


async def bridge_latency(handler: Callable, n: int) -> list[float]:
    """One frame in flight; the MCU side blocks in os.read as the raw echo baseline does."""
    master, name = open_pty()

    async def body(b: Bridge) -> list[float]:
        def pingpong() -> list[float]:
            link = Link()
            rtts = []
            for i in range(n):
                t0 = time.perf_counter()
                seq = link._tx_seq
                os.write(master, link.send(MsgType.SENSOR_FRAME, {"timestamp_ms": i, "samples": SAMPLES}))
                while True:
                    link.receive_data(os.read(master, 4096))
                    if any(m.type == MsgType.INFER_REPLY and m.fields["ref_seq"] == seq for m in link.events()):
                        break
                rtts.append((time.perf_counter() - t0) * 1000)
            return rtts

        return await asyncio.to_thread(pingpong)

    try:
        return await with_bridge(handler, body, master, name)
    finally:
        os.close(master)


async def push_rate(size: int) -> dict[str, Any]:
    """A 64 KiB push to the reference receiver (ModelReceiver) on the MCU side of the pty."""
    blob = os.urandom(size)
    master, name = open_pty()
    rx, link, stop = ModelReceiver(1 << 20), Link(), threading.Event()

    def mcu() -> None:
        os.write(master, link.send(MsgType.HELLO, HELLO))
        while not stop.is_set():
            if not select.select([master], [], [], 0.05)[0]:
                continue
            link.receive_data(os.read(master, 65536))
            for m in link.events():
                for t, f in rx.receive(m):
                    os.write(master, link.send(t, f))

    async def body(b: Bridge) -> dict[str, Any]:
        th = threading.Thread(target=mcu, daemon=True)
        th.start()
        while b.mcu is None:
            await asyncio.sleep(0.01)
        res = await b.push(blob, chunk_size=512)
        stop.set()
        ok = res.ok and rx.blob == blob
        return {"push_ok": ok, "push_kib_s": size / 1024 / res.elapsed_s if ok else 0.0,
                "push_chunks": res.chunks, "push_retransmits": res.retransmits}

    try:
        return await with_bridge(lambda m, f: None, body, master, name)
    finally:
        os.close(master)


def model_handler() -> Callable | None:
    try:
        from agent.serving.inference import InferenceEngine
        from controller.modeltools.example import build_example
        from protocol.bundle import load_bundle
    except ImportError as exc:  # a board without the tools extra
        print(f"(no model figures: {exc})")
        return None
    out = Path(tempfile.mkdtemp()) / "digits"
    build_example(out, "small", seed=0, epochs=30)
    eng = InferenceEngine(load_bundle(out))

    def answer(mcu: str, msg: Any) -> tuple[int, float]:
        p = eng.predict(np.asarray(msg.fields["samples"], np.float32))
        return p.label, p.confidence

    return answer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter runs (well under 60 s)")
    args = ap.parse_args()
    secs, n = (2.0, 300) if args.quick else (8.0, 3000)
    const = lambda mcu, msg: (3, 0.9)  # noqa: E731 - the cheapest answer: the bridge's own cost
    out: dict[str, Any] = {"frame_bytes": len(frames(1)[0]), "quick": args.quick}

    raw_fps = raw_throughput(secs)
    raw_rtt = raw_latency(n)
    thr = asyncio.run(bridge_throughput(const, secs))
    rtt = asyncio.run(bridge_latency(const, n))
    out.update({"raw_frames_per_s": round(raw_fps), "frames_per_s": round(thr["frames_per_s"]),
                "dropped_per_s": round(thr["dropped_per_s"]), "link_drops": thr["link_drops"],
                "read_pauses": thr["read_pauses"],
                "raw_rtt_ms_p50": round(pct(raw_rtt, 50), 4), "rtt_ms_p50": round(pct(rtt, 50), 4),
                "rtt_ms_p99": round(pct(rtt, 99), 4),
                "added_latency_ms_p50": round(pct(rtt, 50) - pct(raw_rtt, 50), 4),
                "added_latency_ms_p99": round(pct(rtt, 99) - pct(raw_rtt, 99), 4)})
    print(f"pty alone          {raw_fps:10.0f} frames/s   echo round trip p50 {pct(raw_rtt, 50):.3f} ms")
    print(f"through the bridge {thr['frames_per_s']:10.0f} frames/s answered ({thr['dropped_per_s']:.0f}/s "
          f"dropped by the queue policy)   round trip p50 {pct(rtt, 50):.3f} ms, p99 {pct(rtt, 99):.3f} ms")
    print(f"added per frame    p50 {out['added_latency_ms_p50']:.3f} ms, p99 {out['added_latency_ms_p99']:.3f} ms")

    handler = model_handler()
    if handler is not None:
        mthr = asyncio.run(bridge_throughput(handler, secs))
        mrtt = asyncio.run(bridge_latency(handler, n // 2))
        out.update({"model_frames_per_s": round(mthr["frames_per_s"]),
                    "model_rtt_ms_p50": round(pct(mrtt, 50), 4), "model_rtt_ms_p99": round(pct(mrtt, 99), 4)})
        print(f"with the int8 model {mthr['frames_per_s']:9.0f} frames/s answered   round trip p50 "
              f"{pct(mrtt, 50):.3f} ms, p99 {pct(mrtt, 99):.3f} ms")

    push = asyncio.run(push_rate(64 << 10))
    out.update({k: (round(v, 1) if isinstance(v, float) else v) for k, v in push.items()})
    print(f"model push 64 KiB  {push['push_kib_s']:.1f} KiB/s in {push['push_chunks']} chunks "
          f"(stop-and-wait; {push['push_retransmits']} retransmits)")
    out["rtt_samples"] = n
    out["stdev_rtt_ms"] = round(statistics.pstdev(rtt), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
