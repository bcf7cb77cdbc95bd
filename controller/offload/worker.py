"""``fleetctl offload-worker --bundle BIG``: serve a larger model to devices that offload, on time.

Features mode: the device sends its backbone's output (split computing); the worker runs its
bigger head over them — only when the device's split (backbone hash) is one this worker accepts.
Raw mode: the worker runs its whole model on the raw input; that model may be a different,
larger one (a *cascade* worker), declared in the bundle's manifest as
``"offload": {"accepts": ["raw"]}`` (default: raw, plus features when the bundle has a head).

Deadlines (DEMS-A, controller/offload/scheduler.py): each request's remaining budget becomes a
local deadline at receive time; requests wait in a bounded EDF queue and one that cannot finish
in time is answered at once ``ok: false, code: "deadline"`` so the board answers locally. The
worker publishes a retained status with its queue estimate and what it accepts (boards route to
its own topic by it), and when idle asks the busiest compatible peer for queued work it would
finish late (``offload.steal``); the victim forwards those requests, re-stamped with the time
left, to the thief's topic. Old boards still reach every worker on the shared subscription.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from protocol.binary import decode_frame, encode_frame
from protocol.bundle import Bundle, head_forward, load_bundle, softmax
from protocol.envelope import DecodeError, Envelope, decode, encode
from protocol.mqttlink import Message, Will
from protocol.offload import (DROP_BUSY, DROP_DEADLINE, REFUSED_BAD_INPUT, REFUSED_INCOMPATIBLE, REFUSED_SPLIT, shared,
                              steal_topic, worker_req_topic, worker_status_topic)
from protocol.topics import Topics

from ..config import ControllerConfig
from ..link import make_link
from .tail import TailModel, TailRefused
from .scheduler import Drop, EdfScheduler, ServiceEstimate, Task

log = logging.getLogger("fleetctl.offload")


class Refused(ValueError):
    """A request this worker will not serve; ``code`` goes into the reply."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code


class OffloadModel:
    def __init__(self, bundle: Bundle, threads: int = 1) -> None:
        import onnxruntime as ort

        self.bundle = bundle
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(bundle.backbone_path), so, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.backbone_sha = bundle.manifest.files[bundle.manifest.file("backbone")].sha256
        self.head = bundle.head
        self.feat_dim = int(bundle.head["dense0.weight"].shape[0]) if bundle.head else None
        declared = (bundle.manifest.raw.get("offload") or {}).get("accepts")
        if declared is not None and (not isinstance(declared, list) or not set(declared) <= {"raw", "features"}):
            raise ValueError(f"manifest offload.accepts must be a list of 'raw'/'features', got {declared!r}")
        modes = set(declared) if declared is not None else {"raw", "features"}
        self.accepts_raw = "raw" in modes
        self.splits = [self.backbone_sha] if "features" in modes and self.head is not None else []
        # features from an exit or through a bottleneck: the segments after it (controller/offload/tail.py)
        self.tail = TailModel(bundle, threads) if bundle.manifest.exits else None
        if self.tail is not None and "features" in modes:
            self.splits += self.tail.splits()

    def accepts(self) -> dict[str, Any]:
        """What the status advertises: raw input (and its shape) and the feature splits served."""
        return {"raw": self.accepts_raw, "splits": list(self.splits),
                "input_shape": list(self.bundle.manifest.input.shape)}

    def check(self, mode: str, body: dict[str, Any]) -> None:
        if mode == "features" and ("split" in body or "codec" in body):
            if self.tail is None:
                raise Refused(REFUSED_SPLIT, "features from an exit or a bottleneck; this worker's bundle has no exits")
            try:
                self.tail.check(body)
            except TailRefused as exc:
                raise Refused(exc.code, str(exc)) from None
        elif mode == "features":
            if self.head is None:
                raise Refused(REFUSED_INCOMPATIBLE, "this worker's bundle has no head to run over features")
            if body.get("backbone_sha256") not in self.splits:
                raise Refused(REFUSED_INCOMPATIBLE, "incompatible features: the device's backbone (split) "
                                                    "differs from this worker's")
        elif not self.accepts_raw:
            raise Refused(REFUSED_INCOMPATIBLE, "this worker does not accept raw input")

    def answer(self, mode: str, x: np.ndarray, body: dict[str, Any]) -> tuple[int, float]:
        if mode == "features" and ("split" in body or "codec" in body):
            self.check(mode, body)
            assert self.tail is not None
            try:
                return self.tail.answer(x, body)
            except TailRefused as exc:
                raise Refused(exc.code, str(exc)) from None
        if mode == "features":
            self.check(mode, body)
            f = x.astype(np.float32).reshape(1, -1) * np.float32(body["scale"])
            if f.shape[1] != self.feat_dim:
                raise Refused(REFUSED_BAD_INPUT, f"features have {f.shape[1]} values, the worker's head takes "
                                                 f"{self.feat_dim}")
        else:
            spec = self.bundle.manifest.input
            try:
                xi = x.astype(np.float32).reshape((1,) + tuple(int(d) for d in spec.shape[1:]))
            except ValueError:
                raise Refused(REFUSED_BAD_INPUT, f"input of {x.size} values does not fit {list(spec.shape)}") from None
            if not np.isfinite(xi).all():
                raise Refused(REFUSED_BAD_INPUT, "input contains NaN or inf")
            f = self.session.run(None, {self.input_name: xi})[0]
        probs = softmax(head_forward(self.head, f)[0]) if self.head else softmax(f[0])
        k = int(probs.argmax())
        return k, float(probs[k])


@dataclass(frozen=True)
class WorkerOptions:
    capacity: int = 64               # bounded EDF queue
    steal: bool = True               # ask busy peers for work when idle
    status_interval_s: float = 2.0   # heartbeat; also published on a queue change, at most every 0.1 s
    emulate_service_ms: float = 0.0  # pad each request to this service time (capacity tests)
    slowdown: float = 1.0            # multiply the service time (fault injection for tests/benchmarks)
    reply_ms: float = 2.0            # kept for the answer's trip back before the deadline

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.status_interval_s <= 0 or self.emulate_service_ms < 0 or self.slowdown < 1:
            raise ValueError("capacity >= 1, status interval > 0, emulate service >= 0, slowdown >= 1")


@dataclass(frozen=True)
class Pending:
    """An admitted request: what it takes to answer it, or to forward it to a thief."""

    frame_env: Envelope
    tensors: dict[str, np.ndarray]
    reply_to: str
    correlation: bytes | None


class OffloadWorker:
    def __init__(self, cfg: ControllerConfig, bundle_path: str | Path, worker_id: str | None = None,
                 threads: int = 1, options: WorkerOptions = WorkerOptions()) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_root)
        self.id = worker_id or f"worker-{os.uname().nodename[:20]}-{os.getpid()}"
        self.model = OffloadModel(load_bundle(bundle_path), threads)
        self.options = options
        self.slowdown = options.slowdown
        self.sched = EdfScheduler(options.capacity, ServiceEstimate(max(1.0, options.emulate_service_ms)),
                                  options.reply_ms)
        self.served = 0
        self.errors = 0
        self.rejected = 0
        self.dropped = {DROP_DEADLINE: 0, DROP_BUSY: 0}
        self.stolen = {"given": 0, "taken": 0, "asked": 0}
        self.busy_s = 0.0
        self.started = time.monotonic()
        self.link = None
        self.peers: dict[str, tuple[float, dict[str, Any]]] = {}
        self._wake = asyncio.Event()
        self._serving = False
        self._last_steal = 0.0
        self._status_dirty = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=f"offload-{self.id}")
        self.status_topic = worker_status_topic(self.topics.base, self.id)
        self.own_topic = worker_req_topic(self.topics.base, self.id)

    # -- status -----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        up = max(1e-9, now - self.started)
        m = self.model.bundle.manifest
        return {"worker": self.id, "served": self.served, "errors": self.errors, "rejected": self.rejected,
                "utilisation": round(self.busy_s / up, 4), "model": f"{m.name}@{m.version}",
                "uptime_s": round(up, 1), "topic": self.own_topic, "accepts": self.model.accepts(),
                "queue_len": len(self.sched) + (1 if self._serving else 0), "capacity": self.sched.capacity,
                "queue_ms": round(self.sched.queue_ms(now), 3), "service_ms": round(self.sched.service.mean, 3),
                "service_tail_ms": round(self.sched.service.tail, 3), "dropped": dict(self.dropped),
                "stolen": dict(self.stolen), "ts": round(time.time(), 3)}

    def _publish_status(self) -> None:
        if self.link is not None:
            self.link.publish(self.status_topic, encode(Envelope(kind="offload.status", sender=self.id,
                                                                 body=self.status())), 1, True)

    # -- lifecycle ----------------------------------------------------------------------
    async def run(self, stop: asyncio.Event, ready=None) -> None:
        req = self.topics.offload_req
        # the broker clears the retained status if this worker dies: boards stop routing to it
        self.link = make_link(self.cfg, self.id, subscriptions=[], will=Will(self.status_topic, b"", 1, True))
        self._wake = asyncio.Event()
        self._status_dirty = asyncio.Event()
        await self.link.start()
        await self.link.wait_connected(15)
        # MQTT 5 shared subscription when the broker has it; plain subscription on 3.1.1
        self.link.subscribe(shared(req) if self.link.is_v5 else req, 1)
        self.link.subscribe(self.own_topic, 1)
        self.link.subscribe(steal_topic(self.topics.base, self.id), 1)
        self.link.subscribe(worker_status_topic(self.topics.base, "+"), 0)
        self._publish_status()
        if ready:
            ready()
        tasks = [asyncio.create_task(self._pump(), name="offload-requests"),
                 asyncio.create_task(self._serve(), name="offload-serve"),
                 asyncio.create_task(self._sweeper(), name="offload-sweep")]
        try:
            while not stop.is_set():
                self._publish_status()
                self._status_dirty.clear()
                try:
                    await asyncio.wait_for(self._status_dirty.wait(), self.options.status_interval_s)
                    await asyncio.sleep(0.1)   # at most ~10 status messages a second under load
                except asyncio.TimeoutError:
                    pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.link.publish(self.status_topic, b"", 1, True)
            await self.link.stop()
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _pump(self) -> None:
        assert self.link is not None
        while True:
            msg = await self.link.messages.get()
            try:
                self.on_message(msg)
            except Exception:  # noqa: BLE001 - never let one request stop the worker
                log.exception("offload message failed")
                self.errors += 1

    def on_message(self, msg: Message) -> None:
        base = self.topics.base
        if msg.topic.startswith(f"{base}/offload/workers/"):
            self._on_peer_status(msg)
        elif msg.topic == steal_topic(base, self.id):
            self._on_steal(msg)
        else:
            self.handle(msg.payload, msg.response_topic, msg.correlation)

    # -- requests -----------------------------------------------------------------------
    def handle(self, payload: bytes, response_topic: str | None = None, correlation: bytes | None = None) -> None:
        now = time.monotonic()
        try:
            frame = decode_frame(payload, max_bytes=self.cfg.mqtt.max_frame_bytes)
        except DecodeError as exc:
            self.rejected += 1
            log.warning("rejected offload request: %s", exc)
            return
        env = frame.envelope
        if env.kind != "offload.request":
            self.rejected += 1
            return
        reply_to = env.reply_to or response_topic
        parsed = self.topics.parse(reply_to or "")
        if not reply_to or parsed is None or parsed[0] != env.sender or parsed[1] != "reply":
            self.rejected += 1
            log.warning("offload request from %s has no reply topic in its own subtree", env.sender)
            return
        body = dict(env.body)
        # the board's clock is not ours: a remaining budget counts from our receive time
        if "budget_ms" in body:
            deadline = now + float(body["budget_ms"]) / 1000.0
        else:
            deadline = now + (float(body["deadline_ts"]) - time.time())
        if "x" not in frame.tensors:
            self._reply(env, reply_to, correlation, self._error(REFUSED_BAD_INPUT, "no tensor 'x' in the request"))
            return
        try:
            self.model.check(body["mode"], body)
        except Refused as exc:
            self.errors += 1
            self._reply(env, reply_to, correlation, self._error(exc.code, str(exc)))
            return
        if "stolen_from" in body:
            self.stolen["taken"] += 1
        item = Pending(env, frame.tensors, reply_to, correlation)
        self._act(self.sched.offer(env.corr or env.id, deadline, now, item))
        self._wake.set()
        self._status_dirty.set()

    def _error(self, code: str, msg: str, **extra: Any) -> dict[str, Any]:
        return {"ok": False, "error": msg, "code": code, "worker": self.id, **extra}

    def _act(self, drops: list[Drop]) -> None:
        """Answer every dropped request at once, with the reason (the board answers locally)."""
        for d in drops:
            p: Pending = d.task.item
            self.dropped[d.code] = self.dropped.get(d.code, 0) + 1
            now = time.monotonic()
            self._reply(p.frame_env, p.reply_to, p.correlation,
                        self._error(d.code, d.reason, queue_ms=round(self.sched.queue_ms(now), 3),
                                    wait_ms=round((now - d.task.arrived) * 1000.0, 3)))

    def _reply(self, env: Envelope, reply_to: str, correlation: bytes | None, body: dict[str, Any]) -> None:
        out = Envelope(kind="offload.reply", sender=self.id, body=body, corr=env.corr or env.id)
        if self.link is not None:
            self.link.publish(reply_to, encode(out), 1, correlation=correlation)

    def _compute(self, mode: str, x: np.ndarray, body: dict[str, Any]) -> tuple[int, float, float]:
        """In the worker's thread: the answer and the service time (emulated/slowed as configured)."""
        t0 = time.perf_counter()
        label, conf = self.model.answer(mode, x, body)
        took = time.perf_counter() - t0
        target = max(took, self.options.emulate_service_ms / 1000.0) * self.slowdown
        if target > took:
            time.sleep(target - took)
        return label, conf, (time.perf_counter() - t0) * 1000.0

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            task, drops = self.sched.next(time.monotonic())
            self._act(drops)
            if task is None:
                self._serving = False
                self._maybe_steal()
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
                continue
            self._serving = True
            p: Pending = task.item
            body = dict(p.frame_env.body)
            wait_ms = (time.monotonic() - task.arrived) * 1000.0
            try:
                label, conf, service_ms = await loop.run_in_executor(
                    self._pool, self._compute, body["mode"], p.tensors["x"], body)
            except Refused as exc:
                self.errors += 1
                self.sched.done(self.sched.service.mean)
                self._reply(p.frame_env, p.reply_to, p.correlation, self._error(exc.code, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a model failure is this request's error, not the worker's end
                log.exception("offload request failed")
                self.errors += 1
                self.sched.done(self.sched.service.mean)
                self._reply(p.frame_env, p.reply_to, p.correlation, self._error("error", f"model failed: {exc}"))
                continue
            self.busy_s += service_ms / 1000.0
            self.sched.done(service_ms)
            self.served += 1
            names = self.model.bundle.manifest.labels
            reply = {"ok": True, "label": label, "label_name": names[label] if label < len(names) else None,
                     "confidence": round(conf, 6), "worker": self.id, "service_ms": round(service_ms, 4),
                     "wait_ms": round(wait_ms, 3), "queue_ms": round(self.sched.queue_ms(time.monotonic()), 3),
                     "queue_len": len(self.sched)}
            if "stolen_from" in body:
                reply["stolen_from"] = body["stolen_from"]
            self._reply(p.frame_env, p.reply_to, p.correlation, reply)
            self._status_dirty.set()
            # a slower service time may leave queued work hopeless: say so now, not when it is popped
            self._act(self.sched.sweep(time.monotonic()))

    async def _sweeper(self) -> None:
        """While a request is served, time passes for the queued ones: drop the hopeless at once."""
        while True:
            await asyncio.sleep(0.02)
            if len(self.sched):
                self._act(self.sched.sweep(time.monotonic()))

    # -- work stealing --------------------------------------------------------------------
    def _on_peer_status(self, msg: Message) -> None:
        wid = msg.topic.rsplit("/", 1)[1]
        if wid == self.id:
            return
        if not msg.payload:
            self.peers.pop(wid, None)
            return
        try:
            env = decode(msg.payload)
        except DecodeError:
            return
        if env.kind == "offload.status":
            self.peers[wid] = (time.monotonic(), dict(env.body))

    def _maybe_steal(self) -> None:
        """Idle: ask the compatible peer with the longest queue for work (at most every 50 ms)."""
        now = time.monotonic()
        if not self.options.steal or self.link is None or now - self._last_steal < 0.05:
            return
        mine = self.model.accepts()
        best, best_q = None, 1
        for wid, (seen, st) in self.peers.items():
            q = int(st.get("queue_len") or 0)
            if now - seen < 5.0 and q > best_q and st.get("accepts") == mine:
                best, best_q = wid, q
        if best is None:
            return
        self._last_steal = now
        self.stolen["asked"] += 1
        body = {"thief": self.id, "n": max(1, min(8, best_q // 2)), "service_ms": round(self.sched.service.mean, 3)}
        self.link.publish(steal_topic(self.topics.base, best),
                          encode(Envelope(kind="offload.steal", sender=self.id, body=body)), 0)

    def _on_steal(self, msg: Message) -> None:
        try:
            env = decode(msg.payload)
        except DecodeError as exc:
            self.rejected += 1
            log.warning("rejected steal request: %s", exc)
            return
        if env.kind != "offload.steal" or self.link is None:
            self.rejected += 1
            return
        thief = str(env.body["thief"])
        now = time.monotonic()
        given = self.sched.steal(int(env.body["n"]), float(env.body.get("service_ms") or self.sched.service.mean),
                                 transfer_ms=5.0, now=now)
        for t in given:
            self._forward(t, thief, now)
        if given:
            self.stolen["given"] += len(given)
            self._status_dirty.set()

    def _forward(self, t: Task, thief: str, now: float) -> None:
        """Hand a queued request to a thief, with the budget that is left (its clock is not ours)."""
        p: Pending = t.item
        body = {**p.frame_env.body, "budget_ms": round(max(0.001, (t.deadline - now) * 1000.0), 3),
                "stolen_from": self.id}
        env = replace(p.frame_env, body=body)
        assert self.link is not None
        self.link.publish(worker_req_topic(self.topics.base, thief), encode_frame(env, p.tensors), 1,
                          response_topic=p.reply_to, correlation=p.correlation)


def backbone_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
