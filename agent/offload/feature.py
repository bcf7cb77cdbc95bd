"""The agent's offload path: per request, answer locally or ask a bigger model, never lose it.

``decide`` (agent/offload/policy.py) picks the path from the local confidence and latency,
the measured round trip, the workers' queue hint and the deadline. When workers publish their
status (queue estimate, accepted inputs), ``WorkerRouter`` (agent/offload/routing.py) picks the
worker with the earliest expected completion that fits the deadline and the request goes to
that worker's own topic; with no such status (old workers) it goes to the shared subscription.
Every request carries its remaining budget (``budget_ms``): the worker drops what it cannot
finish in time and says so at once, and the board answers locally. A reply after the board
gave up is counted (``late_replies``) and dropped: the requester gets exactly one answer. An offloaded request
carries the backbone features (split computing, uint8 with a scale: the raw input never
leaves the board) or the raw input, as the policy says. If no answer comes back in time, the
local answer is returned (``path: local_fallback``); every reply says which path answered.
"""
from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from dataclasses import replace
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from protocol.atomicfile import write_atomic
from protocol.binary import encode_frame
from protocol.envelope import Envelope, new_id
from protocol.mqttlink import Message
from protocol.offload import DROP_BUSY, DROP_DEADLINE, worker_status_topic

from ..core.context import AgentContext, CommandError, Feature, Subscription
from ..serving.histogram import LatencyHistogram
from .policy import LOCAL, LOCAL_LOW, OFFLOAD, OffloadPolicy, RttEstimator, decide
from .routing import WorkerRouter

if TYPE_CHECKING:  # pragma: no cover
    from ..serving.inference import InferenceEngine, Prediction

log = logging.getLogger("edge_agent.offload")


def replace_decision(d):
    from .policy import Decision

    return Decision(OFFLOAD, f"probe: {d.reason}", d.expected_remote_ms)


class Offloader(Feature):
    """Declares ``offload.set``/``offload.status``, its reply topic and the ``offload`` telemetry;
    ``engine`` returns the serving engine (the backbone whose features are sent)."""

    name = "offload"

    def __init__(self, ctx: AgentContext, policy: OffloadPolicy,
                 engine: "Callable[[], InferenceEngine | None]") -> None:
        self.ctx = ctx
        self.engine = engine
        self.policy = policy
        self.reply_topic = ctx.topics.reply(ctx.device_id, "offload")
        self.rtt = RttEstimator()
        self.queue_hint_ms = 0.0
        self.pending: dict[str, asyncio.Future] = {}
        self.router = WorkerRouter()
        self.sent_to: dict[str, tuple[str | None, float]] = {}       # corr -> (worker, sent at)
        # corrs given up on (late replies are counted, not answered twice) and recently answered
        self.expired: OrderedDict[str, tuple[str | None, float]] = OrderedDict()
        self.answered: OrderedDict[str, None] = OrderedDict()
        self.stats: Counter[str] = Counter()
        #: workers' refusals by reason code (split_mismatch, decoder_mismatch, ...)
        self.refusals: Counter[str] = Counter()
        self.remote_hist = LatencyHistogram()
        self.last_attempt = 0.0
        self.probe_interval_s = 5.0
        self.state_file = Path(ctx.cfg.state.dir) / "offload_policy.json"
        self._load()

    # -- declarations ----------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.policy.enabled

    def commands(self) -> dict[str, Any]:
        return {"offload.set": self._cmd_set, "offload.status": lambda args, env: self.telemetry()}

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(self.reply_topic, 1, self._on_reply_message),
                Subscription(worker_status_topic(self.ctx.topics.base, "+"), 0, self._on_worker_status)]

    async def _on_worker_status(self, msg: Message) -> None:
        wid = msg.topic.rsplit("/", 1)[1]
        if not msg.payload:
            self.router.on_status(wid, None, time.monotonic())
            return
        decoded = self.ctx.decode(msg)
        if decoded is None:
            return
        env, _ = decoded
        if env.kind != "offload.status":
            self.ctx.counters.reject("unexpected_kind")
            return
        self.router.on_status(wid, env.body, time.monotonic())

    def _cmd_set(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        try:
            p = self.set_policy(**args)
        except (ValueError, TypeError) as exc:
            raise CommandError(f"bad offload policy: {exc}") from None
        self.ctx.emit_event("offload.policy", enabled=p.enabled, threshold=p.threshold, mode=p.mode,
                            deadline_ms=p.deadline_ms)
        return {"enabled": p.enabled, "threshold": p.threshold, "mode": p.mode, "deadline_ms": p.deadline_ms}

    async def _on_reply_message(self, msg: Message) -> None:
        decoded = self.ctx.decode(msg)
        if decoded is None:
            return
        env, _ = decoded
        if env.kind != "offload.reply":
            self.ctx.counters.reject("unexpected_kind")
            return
        await self.on_reply(env, msg)

    def _load(self) -> None:
        try:
            d = json.loads(self.state_file.read_text())
            self.policy = OffloadPolicy(**d)
        except (OSError, ValueError, TypeError):
            pass

    def set_policy(self, **changes: Any) -> OffloadPolicy:
        allowed = {"enabled", "threshold", "mode", "deadline_ms", "margin_ms"}
        bad = set(changes) - allowed
        if bad:
            raise ValueError(f"unknown offload settings {sorted(bad)}; known: {sorted(allowed)}")
        new = replace(self.policy, **changes)  # validates in __post_init__
        self.policy = new
        write_atomic(self.state_file, json.dumps({k: getattr(new, k) for k in (
            "enabled", "threshold", "mode", "deadline_ms", "margin_ms", "rtt_k")}))
        return new

    def telemetry(self) -> dict[str, Any]:
        s = self.stats
        n = s["requests"] or 1
        h = self.remote_hist.summary()
        judged = s["agree"] + s["disagree"]
        return {"enabled": self.policy.enabled, "threshold": self.policy.threshold, "mode": self.policy.mode,
                "requests": s["requests"], "offloaded": s["offloaded"], "offload_rate": round(s["offloaded"] / n, 4),
                "remote_ok": s["remote_ok"], "timeouts": s["timeouts"], "errors": s["remote_error"],
                "fallbacks": s["fallback"], "low_confidence_local": s["low_local"], "bytes_sent": s["bytes"],
                "remote_latency_ms": {k: h[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
                "rtt_ms": None if self.rtt.srtt is None else round(self.rtt.srtt, 3),
                "agreement": round(s["agree"] / judged, 4) if judged else None,
                "duplicate_replies": s["duplicate_reply"], "unknown_replies": s["unknown_reply"],
                "routed": s["routed"], "answered_remote": s["remote_ok"], "dropped_by_worker": s["dropped_by_worker"],
                "local_after_remote": s["fallback"], "late_replies": s["late_reply"],
                "no_worker_fits": s["no_worker_fits"], "workers": self.router.summary(time.monotonic()),
                "refusals": dict(self.refusals)}

    # -- per request ---------------------------------------------------------
    async def resolve(self, pred: "Prediction", x: Any, local: dict[str, Any],
                      deadline_ms: float | None = None) -> dict[str, Any]:
        """The answer to return for this request (local, remote or local fallback)."""
        t_start = time.monotonic()
        self.stats["requests"] += 1
        up = self.ctx.connected
        engine = self.engine()
        deadline_v = deadline_ms if deadline_ms is not None else self.policy.deadline_ms
        route, no_route = None, None
        if up and engine is not None and self.router.known(t_start) and self.policy.enabled:
            split = self._split(engine, pred) if self.policy.mode == "features" else None
            size = None if self.policy.mode == "features" else int(np.asarray(x).size)
            remaining_ms = deadline_v - pred.latency_ms - self.policy.margin_ms
            route, why = self.router.choose(self.policy.mode, split, size, remaining_ms, t_start)
            if route is None:
                no_route = why
        d = decide(pred.confidence, pred.latency_ms, self.policy, self.rtt, up, deadline_ms, self.queue_hint_ms,
                   routed_ms=route.expected_ms if route else None, no_route=no_route)
        if d.path == LOCAL_LOW and up and no_route is None and route is None and d.expected_remote_ms is not None \
                and time.monotonic() - self.last_attempt >= self.probe_interval_s:
            # the estimate may be stale (workers came back): probe once every few seconds
            d = replace_decision(d)
            self.stats["probes"] += 1
        if d.path == LOCAL:
            return {**local, "path": "local"}
        if d.path == LOCAL_LOW:
            self.stats["low_local"] += 1
            if no_route is not None:
                self.stats["no_worker_fits"] += 1
            return {**local, "path": "local", "low_confidence": True, "offload_skipped": d.reason}
        deadline = deadline_v / 1000.0
        remaining = deadline - pred.latency_ms / 1000.0 - self.policy.margin_ms / 1000.0
        corr = new_id()
        if engine is None:  # the model went away while this request waited
            self.stats["fallback"] += 1
            return {**local, "path": "local_fallback", "offload_error": "no model loaded"}
        left = remaining - (time.monotonic() - t_start)
        # budget_ms: the time left, counted by the worker from its own receive time (clocks differ)
        body: dict[str, Any] = {"mode": self.policy.mode, "deadline_ts": time.time() + left,
                                "budget_ms": round(max(0.001, left * 1000.0), 3),
                                "model": engine.bundle.manifest.name}
        compress = False
        exits = getattr(engine, "exits", None)
        if self.policy.mode == "features" and exits is not None:
            # from an exit, or the bottleneck code at the cut (agent/serving/exits.py)
            tensor, extra, compress = exits.offload_tensor(pred)
            body.update(extra)
            if "split" not in extra:
                b = engine.bundle
                body["backbone_sha256"] = b.manifest.files[b.manifest.file("backbone")].sha256
        elif self.policy.mode == "features":
            f = np.asarray(pred.features, np.float32).reshape(-1)
            top = float(f.max()) if f.size else 0.0
            scale = top / 255.0 if top > 0 else 1.0
            tensor = np.clip(np.round(f / scale), 0, 255).astype(np.uint8)
            body.update(scale=scale, backbone_sha256=self._split(engine))
        else:
            tensor = np.asarray(x, np.float32)
        env = Envelope(kind="offload.request", sender=self.ctx.device_id, body=body, reply_to=self.reply_topic,
                       corr=corr)
        payload = encode_frame(env, {"x": tensor}, compress=compress)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self.pending[corr] = fut
        self.last_attempt = time.monotonic()
        sent_at = time.monotonic()
        wid = route.worker if route else None
        topic = route.topic if route else self.ctx.topics.offload_req
        ok = self.ctx.publish(topic, payload, 1, response_topic=self.reply_topic, correlation=corr.encode())
        if not ok:
            self.pending.pop(corr, None)
            self.stats["fallback"] += 1
            return {**local, "path": "local_fallback", "offload_error": "not connected"}
        self.sent_to[corr] = (wid, sent_at)
        if wid is not None:
            self.router.on_sent(wid)
            self.stats["routed"] += 1
        self.stats["offloaded"] += 1
        self.stats["bytes"] += len(payload)
        try:
            reply = await asyncio.wait_for(fut, max(0.001, remaining - (time.monotonic() - t_start)))
        except asyncio.TimeoutError:
            self.pending.pop(corr, None)
            self.sent_to.pop(corr, None)
            self._remember(self.expired, corr, (wid, sent_at))
            self.stats["timeouts"] += 1
            self.stats["fallback"] += 1
            if wid is not None:
                self.router.on_timeout(wid, time.monotonic())
            else:
                self.rtt.timeout_penalty(deadline * 1000)
            return {**local, "path": "local_fallback", "offload_error": "no answer before the deadline"}
        finally:
            self.sent_to.pop(corr, None)
        rtt_ms = (time.monotonic() - sent_at) * 1000
        self._remember(self.answered, corr, None)
        if wid is not None or reply.get("worker") in self.router.workers:
            self.router.on_reply(wid or reply.get("worker"), rtt_ms, reply, time.monotonic())
        if not reply.get("ok"):
            if reply.get("code") in (DROP_DEADLINE, DROP_BUSY):
                self.stats["dropped_by_worker"] += 1
            else:
                self.stats["remote_error"] += 1
                if isinstance(reply.get("code"), str):   # incompatible, split_mismatch, decoder_mismatch, ...
                    self.refusals[reply["code"][:40]] += 1
            self.stats["fallback"] += 1
            return {**local, "path": "local_fallback", "offload_error": reply.get("error"),
                    "offload_code": reply.get("code"), "worker": reply.get("worker")}
        self.rtt.observe(rtt_ms)
        self.remote_hist.record(rtt_ms)
        self.queue_hint_ms = float(reply.get("queue_ms") or 0.0)
        self.stats["remote_ok"] += 1
        self.stats["agree" if int(reply["label"]) == local["label"] else "disagree"] += 1
        return {"label": int(reply["label"]), "label_name": reply.get("label_name"),
                "confidence": float(reply["confidence"]), "path": "remote", "worker": reply.get("worker"),
                "remote_ms": round(rtt_ms, 3), "local": {"label": local["label"], "confidence": local["confidence"]}}

    @staticmethod
    def _split(engine: "InferenceEngine", pred: "Prediction | None" = None) -> str:
        """The split a worker must serve for these features: the backbone, or (early exits) the
        exit's split / the bottleneck's split + pair (agent/serving/exits.py)."""
        exits = getattr(engine, "exits", None)
        if exits is not None and pred is not None:
            return exits.routing_split(pred)
        b = engine.bundle
        return b.manifest.files[b.manifest.file("backbone")].sha256

    @staticmethod
    def _remember(d: "OrderedDict", key: str, value: Any, cap: int = 4096) -> None:
        d[key] = value
        while len(d) > cap:
            d.popitem(last=False)

    async def on_reply(self, env: Envelope, msg: Message) -> None:
        corr = env.corr or ""
        fut = self.pending.pop(corr, None)
        if fut is None:
            if corr in self.expired:
                # after the board answered locally: counted and dropped (never a second answer);
                # its round trip still says how slow that worker is
                wid, sent_at = self.expired.pop(corr)
                self.stats["late_reply"] += 1
                who = wid or env.body.get("worker")
                if isinstance(who, str):
                    self.router.on_reply(who, (time.monotonic() - sent_at) * 1000, env.body, time.monotonic(),
                                         late=True)
            else:
                # a duplicate from a second worker (MQTT 3.1.1: no shared subscription), or unknown
                self.stats["duplicate_reply" if corr in self.answered or corr else "unknown_reply"] += 1
            return
        if not fut.done():
            fut.set_result(dict(env.body))
