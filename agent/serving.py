"""Model serving on the agent: inference requests over MQTT, streaming sources, results.

Wiring only: the engine (``agent.inference``) does the maths, the bundle loader
(``protocol.bundle``) verifies files, sources (``agent.sources``) produce samples and the
results limiter (``agent.results``) decides what to publish. A bad request gets a clear
error reply and the next one is served normally; a bad bundle is refused and the agent
keeps the model it had.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, TYPE_CHECKING

import numpy as np

from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message

if TYPE_CHECKING:  # pragma: no cover
    from .daemon import Agent

log = logging.getLogger("edge_agent.serving")


class Serving:
    """Owns the current engine; swaps it atomically on a new bundle."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.engine: Any = None
        self.bundle: Any = None
        self.errors = 0
        self.requests = 0
        self.load_error: str | None = None

    # -- model lifecycle -------------------------------------------------
    def load(self, path: str) -> None:
        """Load and verify a bundle; on failure keep the current model and raise."""
        from protocol.bundle import BundleError, load_bundle
        from .inference import InferenceEngine

        mcfg = self.agent.cfg.model
        try:
            bundle = load_bundle(path)
            engine = InferenceEngine(bundle, threads=mcfg.threads, providers=list(mcfg.providers) or None)
        except BundleError as exc:
            self.load_error = str(exc)
            self.agent.counters.reject("bad_bundle")
            self.agent.emit_event("model.refused", "error", path=str(path), reason=str(exc))
            raise
        self.bundle, self.engine, self.load_error = bundle, engine, None
        log.info("serving %s@%s", bundle.manifest.name, bundle.manifest.version)

    def model_info(self) -> dict[str, Any] | None:
        if self.bundle is None:
            return None
        m = self.bundle.manifest
        return {"name": m.name, "version": m.version}

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "errors": self.errors}
        if self.engine is not None:
            out.update(self.engine.metrics())
        if self.load_error:
            out["load_error"] = self.load_error
        return out

    # -- requests --------------------------------------------------------
    def predict(self, x: Any) -> Any:
        if self.engine is None:
            raise LookupError("no model loaded on this device")
        return self.engine.predict(np.asarray(x, dtype=np.float32))

    async def handle_request(self, env: Envelope, msg: Message) -> None:
        from .inference import InputError

        self.requests += 1
        try:
            pred = self.predict(env.body["x"])
        except (InputError, LookupError, ValueError, TypeError) as exc:
            self.errors += 1
            self.agent.counters.reject("bad_request")
            self.agent.reply(env, msg, {"ok": False, "error": str(exc)})
            return
        body = prediction_body(pred)
        if env.body.get("label") is not None:
            body["label_given"] = env.body["label"]
        self.agent.reply(env, msg, {"ok": True, "result": body})


def prediction_body(pred: Any) -> dict[str, Any]:
    return {"label": int(pred.label), "label_name": pred.label_name, "confidence": round(float(pred.confidence), 5),
            "entropy": round(float(pred.entropy), 5), "latency_ms": round(float(pred.latency_ms), 4),
            "path": "local"}
