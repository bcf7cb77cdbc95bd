"""A sensor MCU on a serial port as a sub-device of this agent (wiring only).

``firmware_bridge`` owns the port and the protocol; this module connects it to the agent:

* SENSOR_FRAMEs become samples of the agent's inference through a ``PushSource`` served by
  the serving feature's ``run_source`` (serving is handed in at construction), so results, offload and learning see them like any other source; the
  model's answer goes back as INFER_REPLY (every SENSOR_FRAME asks for one). The bridge's own
  bounded queue and drop policy (``[bridge]``) are the only buffer: the source holds one sample.
* HELLO/RESULT/LOG/HEARTBEAT become telemetry under ``mcu`` (one entry per MCU device id, with
  ``online``) and events ``mcu.*`` (token-bucket limited, suppressed ones counted), so dashboards
  see each MCU as a sub-device; ``mcu.online``/``mcu.offline`` mark silence longer than
  ``bridge.offline_after_s``.
* Command ``mcu.push {"file": NAME}`` sends a file of the installed bundle (hash re-checked) down
  in acknowledged chunks; the MCU's final ACK/NACK becomes ``mcu.model.pushed`` / ``mcu.model.failed``.

``agent.mcu.standalone`` is ``edge-agent bridge``: the same bridge without MQTT, for bring-up.
"""
from __future__ import annotations

import asyncio
from collections import Counter
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from firmware_bridge.bridge import Bridge, BridgeConfig
from firmware_bridge.frames import Message
from firmware_bridge.push import MAX_CHUNKS, max_chunk_size

from ..core import hass
from ..core.context import AgentContext, CommandError, Feature
from ..core.ratelimit import TokenBucket
from ..serving.inference import InputError
from ..serving.sources import PushSource, Sample

if TYPE_CHECKING:  # pragma: no cover
    from protocol.envelope import Envelope

    from ..serving.inference import InferenceEngine, Prediction

log = logging.getLogger("edge_agent.mcu")

LOG_LEVELS = {0: "debug", 1: "info", 2: "warning", 3: "error"}
REPLY_TIMEOUT_S = 5.0      # a sample the serving loop never answers (model swapped under it) is given up
MAX_DEVICES = 16           # sub-devices remembered (an MCU swapped on the port is a new one)


class ServingPort(Protocol):
    """What the bridge needs of serving: the engine, every served prediction, and a source slot."""

    engine: "InferenceEngine | None"
    observers: "list[Callable[[str, Prediction, int | None], None]]"

    async def run_source(self, source: Any) -> None: ...


class McuBridge(Feature):
    name = "mcu"

    def __init__(self, ctx: AgentContext, serving: ServingPort) -> None:
        self.ctx = ctx
        self.serving = serving
        self.cfg = c = ctx.cfg.bridge
        self.bridge = Bridge(BridgeConfig(port=c.port, baud=c.baud, max_frame=c.max_frame, queue_size=c.queue_size,
                                          policy=c.policy, agent_id=ctx.device_id), self._on_frame, self._on_event)
        self.source = PushSource(1, name="mcu")
        self.devices: dict[str, dict[str, Any]] = {}
        self.counts: Counter[str] = Counter()
        self.last_push: dict[str, Any] | None = None
        self._limiter = TokenBucket(rate=2.0, burst=20)
        self._waiting: dict[str, asyncio.Future] = {}
        self._n = 0
        self._push_task: asyncio.Task | None = None
        serving.observers.append(self._observe)

    # -- declarations ----------------------------------------------------------
    def commands(self) -> dict[str, Any]:
        return {"mcu.push": self._cmd_push, "mcu.status": lambda args, env: self.telemetry()}

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [("mcu", self.run)]

    def discovery(self) -> list[tuple[str, bytes]]:
        return self.hass_messages()

    async def run(self) -> None:
        """The agent's ``mcu`` task: the port, the source feeding inference, the silence watch."""
        stop = asyncio.Event()
        tasks = [asyncio.create_task(self.bridge.run(stop), name="mcu-serial"),
                 asyncio.create_task(self.serving.run_source(self.source), name="mcu-source"),
                 asyncio.create_task(self._watch(), name="mcu-watch")]
        try:
            await asyncio.gather(*tasks)
        finally:
            stop.set()
            for t in tasks[1:] + ([self._push_task] if self._push_task else []):
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- sensor frames -> inference -> INFER_REPLY -------------------------------------
    async def _on_frame(self, mcu: str, msg: Message) -> tuple[int, float] | None:
        self.counts["frames"] += 1
        self._seen(mcu)
        engine = self.serving.engine
        if engine is None:
            self.counts["no_model"] += 1
            return None
        try:
            x = engine.validate(msg.fields["samples"])  # refused here, the serving loop never waits on it
        except InputError as exc:
            self.counts["bad_input"] += 1
            self._event("mcu.bad_input", "warning", mcu=mcu, reason=str(exc))
            return None
        self._n += 1
        sid = f"{mcu}:{self._n}"
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting[sid] = fut
        self.source.push(Sample(sid, x, None, "mcu"))
        try:
            label, conf = await asyncio.wait_for(fut, REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            self.counts["reply_timeouts"] += 1
            return None
        finally:
            self._waiting.pop(sid, None)
        self.counts["answered"] += 1
        d = self._device(mcu)
        d["answered"] += 1
        d["results_total"] += 1
        names = engine.labels
        d["last_result"] = {"label": names[label] if label < len(names) else str(label),
                            "confidence": round(conf, 5), "source": "board"}
        return label, conf

    def _observe(self, sid: str, pred: "Prediction", label: int | None) -> None:
        fut = self._waiting.get(sid)
        if fut is not None and not fut.done():
            fut.set_result((pred.label, pred.confidence))

    # -- MCU messages -> telemetry and events --------------------------------------------
    def _device(self, mcu: str) -> dict[str, Any]:
        d = self.devices.get(mcu)
        if d is None:
            if len(self.devices) >= MAX_DEVICES:
                del self.devices[min(self.devices, key=lambda k: self.devices[k]["last_seen"])]
            # results: the MCU's own (on-MCU model); answered: the board's, on this MCU's frames
            d = self.devices[mcu] = {"online": True, "last_seen": time.monotonic(), "hellos": 0, "results": 0,
                                     "answered": 0, "results_total": 0, "logs": Counter()}
        return d

    def _seen(self, mcu: str | None) -> None:
        if not mcu or mcu == "?":
            return
        d = self._device(mcu)
        d["last_seen"] = time.monotonic()
        if not d["online"]:
            d["online"] = True
            self._event("mcu.online", "info", mcu=mcu, limited=False)

    def _on_event(self, e: dict[str, Any]) -> None:
        kind, mcu = e["event"], e.get("mcu") or e.get("device_id")
        if kind == "mcu.port_lost":
            self._event(kind, "warning", port=self.cfg.port, reason=e.get("reason"), mcu=mcu, limited=False)
            return
        self._seen(mcu)
        if not mcu:
            self.counts["before_hello"] += 1
            return
        d = self._device(mcu)
        if kind == "mcu.hello":
            d["hellos"] += 1
            d.update({k: e[k] for k in ("firmware", "sensors", "samples_per_frame", "max_frame")})
            self._event(kind, "info", mcu=mcu, firmware=e["firmware"], sensors=e["sensors"],
                        samples_per_frame=e["samples_per_frame"])
            if d["hellos"] == 1 and self.ctx.cfg.homeassistant.enabled:
                self.ctx.announce_discovery()   # the board's announcement now includes this MCU
        elif kind == "mcu.result":
            d["results"] += 1
            d["results_total"] += 1
            d["last_result"] = {"label": e["label"], "confidence": round(e["confidence"], 5),
                                "timestamp_ms": e["timestamp_ms"]}
            self._event(kind, "info", mcu=mcu, **d["last_result"])
            d["last_result"]["source"] = "mcu"
        elif kind == "mcu.log":
            level = LOG_LEVELS.get(e["level"], "info")
            d["logs"][level] += 1
            d["last_log"] = {"level": level, "text": e["text"]}
            if level != "debug":
                self._event(kind, level, mcu=mcu, text=e["text"])
        elif kind == "mcu.heartbeat":
            d["uptime_s"] = e["uptime_s"]

    def hass_messages(self) -> list[tuple[str, bytes]]:
        """HA discovery of every MCU seen (re-announced with the board's own on HA's birth)."""
        if not self.ctx.cfg.homeassistant.enabled:
            return []
        out: list[tuple[str, bytes]] = []
        for mcu, d in self.devices.items():
            out += hass.mcu_discovery_messages(self.ctx.topics, self.ctx.device_id,
                                               self.ctx.cfg.homeassistant.prefix, mcu, d.get("firmware"),
                                               self.ctx.cfg.device.location)
        return out

    def _event(self, event: str, level: str, limited: bool = True, **data: Any) -> None:
        if limited and not self._limiter.allow(time.monotonic()):
            self.counts["events_suppressed"] += 1
            return
        self.ctx.emit_event(event, level, **data)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.offline_after_s / 4))
            now = time.monotonic()
            for mcu, d in self.devices.items():
                if d["online"] and now - d["last_seen"] > self.cfg.offline_after_s:
                    d["online"] = False
                    self._event("mcu.offline", "warning", mcu=mcu, silent_s=round(now - d["last_seen"], 1),
                                limited=False)

    def telemetry(self) -> dict[str, Any]:
        now = time.monotonic()
        devices = {mcu: {**{k: (dict(v) if isinstance(v, Counter) else v) for k, v in d.items() if k != "last_seen"},
                         "last_seen_s": round(now - d["last_seen"], 2)} for mcu, d in self.devices.items()}
        st = self.bridge.stats()
        out = {"port": self.cfg.port, "connected": st["connected"], "devices": devices, **dict(self.counts),
               "bridge": {k: st[k] for k in self.bridge.counters}, "queued": st["queued"], "link": st["link"]}
        if "push" in st:
            out["push"] = st["push"]
        if self.last_push:
            out["last_push"] = self.last_push
        return out

    # -- model push ----------------------------------------------------------------------
    def _cmd_push(self, args: dict[str, Any], env: "Envelope") -> dict[str, Any]:
        err = CommandError
        name = args.get("file")
        if not isinstance(name, str) or not name:
            raise err("args.file: the name of a file in the installed model bundle is required")
        engine = self.serving.engine
        if engine is None:
            raise err("no model is installed: nothing to push from")
        m = engine.bundle.manifest
        entry = m.files.get(name)
        if entry is None:
            raise err(f"{name!r} is not in bundle {m.name} {m.version} (files: {', '.join(sorted(m.files))})")
        try:
            blob = (engine.bundle.path / name).read_bytes()
        except OSError as exc:
            raise err(f"cannot read {name}: {exc.strerror}") from None
        if hashlib.sha256(blob).hexdigest() != entry.sha256:
            raise err(f"{name}: SHA-256 differs from the manifest (altered on disk); not pushed")
        mcu = (self.bridge.mcu or {}).get("device_id")
        if mcu is None:
            raise err(f"no MCU has said HELLO on {self.cfg.port}")
        if self._push_task is not None and not self._push_task.done():
            raise err("a push is already running")
        chunk = min(self.cfg.push_chunk_bytes, max_chunk_size(min(self.cfg.max_frame,
                                                                   int(self.bridge.mcu.get("max_frame") or 0xFFFF))))
        if not blob or len(blob) > chunk * MAX_CHUNKS:
            raise err(f"{name}: {len(blob)} bytes; a push carries 1..{chunk * MAX_CHUNKS} with {chunk}-byte chunks")
        self._push_task = asyncio.ensure_future(self._push(mcu, name, blob, f"{m.name} {m.version}"))
        return {"started": True, "mcu": mcu, "file": name, "bytes": len(blob), "chunk_bytes": chunk}

    @property
    def attached(self) -> str | None:
        """The device id of the MCU on the port (None until it said HELLO)."""
        return (self.bridge.mcu or {}).get("device_id")

    async def push_file(self, name: str, blob: bytes, bundle: str) -> tuple[bool, str]:
        """Push a file of a model update (agent.updater); (ok, reason) once the MCU has answered."""
        mcu = self.attached
        if mcu is None:
            return False, f"no MCU has said HELLO on {self.cfg.port}"
        if self._push_task is not None and not self._push_task.done():
            await asyncio.gather(self._push_task, return_exceptions=True)
        self._push_task = asyncio.ensure_future(self._push(mcu, name, blob, bundle))
        res = await self._push_task
        return res.ok, "" if res.ok else f"{res.reason}: {res.detail}"

    async def _push(self, mcu: str, name: str, blob: bytes, bundle: str) -> Any:
        c = self.cfg
        res = await self.bridge.push(blob, chunk_size=c.push_chunk_bytes, ack_timeout_s=c.push_ack_timeout_s or None,
                                     retries=c.push_retries)
        data = {"mcu": mcu, "file": name, "bundle": bundle, "bytes": res.size, "chunks": res.chunks,
                "retransmits": res.retransmits, "elapsed_s": res.elapsed_s, "transfer_id": res.transfer_id}
        self.last_push = {"ok": res.ok, **data, **({} if res.ok else {"reason": res.reason})}
        if res.ok:
            self.ctx.emit_event("mcu.model.pushed", "info", **data)
        else:
            self.ctx.emit_event("mcu.model.failed", "error", reason=res.reason, detail=res.detail, **data)
        return res
