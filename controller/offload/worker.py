"""``fleetctl offload-worker --bundle BIG``: serve a larger model to devices that offload.

Features mode: the device sends its backbone's output (split computing); the worker runs its
bigger head over them — only when the device's backbone is the same as the worker's (hash
check), otherwise the request is refused with the reason. Raw mode: the worker runs its whole
model (backbone + head) on the raw input. Workers share one MQTT 5 subscription, so adding a
worker adds capacity; each publishes a retained status (served, errors, utilisation).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from protocol.binary import decode_frame
from protocol.bundle import Bundle, head_forward, load_bundle, softmax
from protocol.envelope import DecodeError, Envelope, encode
from protocol.offload import shared, worker_status_topic
from protocol.topics import Topics

from ..config import ControllerConfig
from ..link import make_link
from .tail import TailModel, TailRefused

log = logging.getLogger("fleetctl.offload")


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
        # features from an exit or through a bottleneck: the segments after it (controller/offload/tail.py)
        self.tail = TailModel(bundle, threads) if bundle.manifest.exits else None

    def answer(self, mode: str, x: np.ndarray, body: dict[str, Any]) -> tuple[int, float]:
        if mode == "features" and ("split" in body or "codec" in body):
            if self.tail is None:
                raise TailRefused("split_mismatch", "features from an exit or bottleneck; this worker's bundle has "
                                                    "no exits")
            return self.tail.answer(x, body)
        if mode == "features":
            if self.head is None:
                raise ValueError("this worker's bundle has no head to run over features")
            if body.get("backbone_sha256") != self.backbone_sha:
                raise ValueError("incompatible features: the device's backbone differs from this worker's")
            f = x.astype(np.float32).reshape(1, -1) * np.float32(body["scale"])
            if f.shape[1] != self.feat_dim:
                raise ValueError(f"features have {f.shape[1]} values, the worker's head takes {self.feat_dim}")
        else:
            spec = self.bundle.manifest.input
            xi = x.astype(np.float32).reshape((1,) + tuple(int(d) for d in spec.shape[1:]))
            if not np.isfinite(xi).all():
                raise ValueError("input contains NaN or inf")
            f = self.session.run(None, {self.input_name: xi})[0]
        probs = softmax(head_forward(self.head, f)[0]) if self.head else softmax(f[0])
        k = int(probs.argmax())
        return k, float(probs[k])


class OffloadWorker:
    def __init__(self, cfg: ControllerConfig, bundle_path: str | Path, worker_id: str | None = None,
                 threads: int = 1) -> None:
        self.cfg = cfg
        self.topics = Topics(cfg.mqtt.topic_root)
        self.id = worker_id or f"worker-{os.uname().nodename[:20]}-{os.getpid()}"
        self.model = OffloadModel(load_bundle(bundle_path), threads)
        self.served = 0
        self.errors = 0
        self.rejected = 0
        self.busy_s = 0.0
        self.started = time.monotonic()
        self.link = None

    def status(self) -> dict[str, Any]:
        up = max(1e-9, time.monotonic() - self.started)
        m = self.model.bundle.manifest
        return {"worker": self.id, "served": self.served, "errors": self.errors, "rejected": self.rejected,
                "utilisation": round(self.busy_s / up, 4), "model": f"{m.name}@{m.version}",
                "uptime_s": round(up, 1)}

    async def run(self, stop: asyncio.Event, ready=None) -> None:
        req = self.topics.offload_req
        # MQTT 5 shared subscription when the broker has it; plain subscription on 3.1.1
        self.link = make_link(self.cfg, self.id, subscriptions=[])
        await self.link.start()
        await self.link.wait_connected(15)
        self.link.subscribe(shared(req) if self.link.is_v5 else req, 1)
        status_topic = worker_status_topic(self.topics.base, self.id)
        if ready:
            ready()
        pump = asyncio.create_task(self._pump(), name="offload-requests")
        try:
            while not stop.is_set():
                self.link.publish(status_topic, encode(Envelope(kind="offload.status", sender=self.id,
                                                                body=self.status())), 1, True)
                try:
                    await asyncio.wait_for(stop.wait(), 2.0)
                except asyncio.TimeoutError:
                    pass
        finally:
            pump.cancel()
            self.link.publish(status_topic, b"", 1, True)
            await self.link.stop()

    async def _pump(self) -> None:
        assert self.link is not None
        while True:
            msg = await self.link.messages.get()
            t0 = time.perf_counter()
            try:
                self.handle(msg.payload, msg.response_topic, msg.correlation)
            except Exception:  # noqa: BLE001 - never let one request stop the worker
                log.exception("offload request failed")
                self.errors += 1
            self.busy_s += time.perf_counter() - t0

    def handle(self, payload: bytes, response_topic: str | None = None, correlation: bytes | None = None) -> None:
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
        body: dict[str, Any]
        if time.time() > float(env.body["deadline_ts"]):
            body = {"ok": False, "error": "deadline passed before the worker got to it", "worker": self.id}
        elif "x" not in frame.tensors:
            body = {"ok": False, "error": "no tensor 'x' in the request", "worker": self.id}
        else:
            t0 = time.perf_counter()
            try:
                label, conf = self.model.answer(env.body["mode"], frame.tensors["x"], dict(env.body))
                names = self.model.bundle.manifest.labels
                body = {"ok": True, "label": label, "label_name": names[label] if label < len(names) else None,
                        "confidence": round(conf, 6), "worker": self.id,
                        "service_ms": round((time.perf_counter() - t0) * 1000, 4),
                        "queue_ms": round(self.link.messages.qsize() * 1000 * max(1e-4, self.busy_s / max(1, self.served)), 3)
                        if self.link else 0.0}
                self.served += 1
            except ValueError as exc:
                self.errors += 1
                body = {"ok": False, "error": str(exc), "worker": self.id,
                        **({"reason": exc.reason} if isinstance(exc, TailRefused) else {})}
        out = Envelope(kind="offload.reply", sender=self.id, body=body, corr=env.corr or env.id)
        if self.link is not None:
            self.link.publish(reply_to, encode(out), 1, correlation=correlation)


def backbone_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
