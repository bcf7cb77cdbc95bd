"""``edge-agent bridge``: the firmware bridge alone, without MQTT, for bring-up on the bench."""
from __future__ import annotations

import asyncio
from dataclasses import asdict
import json
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from firmware_bridge.bridge import Bridge, BridgeConfig
from firmware_bridge.frames import Message
from protocol.lifecycle import StopSignals

from ..serving.inference import InputError


async def run_standalone(port: str, baud: int, bundle: str | None = None, push: str | None = None,
                         seconds: float = 0.0, out: IO[str] = sys.stdout) -> int:
    """The bridge alone (bring-up, no MQTT): MCU events as JSON lines, sensor frames answered by
    ``bundle``'s model if given; ``push`` sends a file and exits 0/1 on the MCU's final answer."""
    engine = None
    if bundle:
        from protocol.bundle import BundleError, load_bundle

        from ..serving.inference import InferenceEngine

        try:
            engine = InferenceEngine(load_bundle(bundle))
        except (BundleError, ValueError, RuntimeError) as exc:
            print(json.dumps({"event": "error", "reason": f"bundle {bundle}: {exc}"}), file=out, flush=True)
            return 2

    def emit(obj: dict[str, Any]) -> None:
        print(json.dumps(obj, default=str), file=out, flush=True)

    def on_frame(mcu: str, msg: Message) -> tuple[int, float] | None:
        if engine is None:
            return None
        try:
            p = engine.predict(np.asarray(msg.fields["samples"], np.float32))
        except InputError:
            return None
        return p.label, p.confidence

    b = Bridge(BridgeConfig(port=port, baud=baud), on_frame, emit)
    stop = asyncio.Event()
    signals = StopSignals(stop).install()
    task = asyncio.create_task(b.run(stop), name="bridge")
    code = 0
    try:
        if push:
            try:
                blob = Path(push).read_bytes()
            except OSError as exc:
                emit({"event": "error", "reason": f"cannot read {push}: {exc.strerror}"})
                return 2
            deadline = time.monotonic() + (seconds or 10.0)
            while b.mcu is None and time.monotonic() < deadline and not stop.is_set():
                await asyncio.sleep(0.05)
            res = await b.push(blob)
            emit({"event": "mcu.model.pushed" if res.ok else "mcu.model.failed", **asdict(res)})
            code = 0 if res.ok else 1
        elif seconds:
            await asyncio.wait_for(stop.wait(), seconds)
        else:
            await stop.wait()
    except asyncio.TimeoutError:
        pass
    finally:
        stop.set()
        await task
        signals.remove()
        emit({"event": "bridge.stats", **b.stats()})
    return code
