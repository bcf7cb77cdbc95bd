"""Wiring of on-device learning and federated rounds into the running agent.

The learner sees every served inference (features are cached: training never re-runs the
backbone), takes labels inline or later by feedback (``feedback`` request on the device's
request topic), trains in a worker thread within its CPU share, and hands adopted heads to
the inference engine, which swaps them atomically.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from protocol.envelope import Envelope
from protocol.mqttlink import Message

from .learning import LearnConfig, Learner

if TYPE_CHECKING:  # pragma: no cover
    from .daemon import Agent

log = logging.getLogger("edge_agent.learning")


def _reference_stats(engine: Any) -> tuple[float, float]:
    ref = engine.bundle.npz("reference") or engine.bundle.npz("eval")
    if ref is None:
        return 1.0, 0.0
    preds = [engine.predict(x) for x in ref["x"][:64]]
    return float(np.mean([p.confidence for p in preds])), float(np.mean([p.entropy for p in preds]))


class Adaptation:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.learner: Learner | None = None
        self.participant: Any = None
        self.cycles = 0

    def start(self) -> None:
        """Build the learner for the serving bundle (if it has a head) and restore its checkpoint."""
        engine = self.agent.serving.engine
        cfg = self.agent.cfg.learning
        if engine is None or engine.head is None:
            return
        lc = LearnConfig(trigger=cfg.trigger, every_n=cfg.every_n, optimizer=cfg.optimizer, lr=cfg.lr,
                         momentum=cfg.momentum, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size,
                         max_steps=cfg.max_steps, budget_s=cfg.budget_s, cpu_fraction=cfg.cpu_fraction,
                         buffer_bytes=cfg.buffer_bytes, policy=cfg.policy, holdout_every=cfg.holdout_every,
                         min_holdout=cfg.min_holdout, min_train=cfg.min_train, adopt_margin=cfg.adopt_margin,
                         pending_max=cfg.pending_max, pending_ttl_s=cfg.pending_ttl_s, isolate=cfg.isolate)
        conf, ent = _reference_stats(engine)
        learner = Learner(dict(engine.head), len(engine.labels) or int(list(engine.head.values())[-1].shape[0]), lc,
                          Path(self.agent.cfg.state.dir) / "learning", engine.bundle.id, conf, ent)
        why = learner.load_checkpoint()
        if why is None:
            engine.swap_head(learner.head)
            log.info("restored head v%d from checkpoint", learner.head_version)
            self.agent.emit_event("learning.restored", head_version=learner.head_version)
        learner.enabled = cfg.enabled
        self.learner = learner
        self.agent.serving.observers.append(self._observe)
        self.agent.request_handlers["feedback"] = self.on_feedback
        self.agent.telemetry_providers["learning"] = learner.status
        c = self.agent.commands
        c["learn.start"], c["learn.stop"], c["learn.now"], c["learn.status"] = (
            self._cmd_start, self._cmd_stop, self._cmd_now, lambda a, e: learner.status())
        if cfg.federated:
            from .federated import Participant

            self.participant = Participant(self.agent, learner, learner.shapes)
            self.agent.control_handlers["fl.task"] = self.participant.on_task
            self.agent.control_handlers["fl.ack"] = self.participant.on_ack
            self.agent.control_handlers["fl.head"] = self.on_global_head

    def _observe(self, sample_id: str, pred: Any, label: int | None) -> None:
        assert self.learner is not None
        why = self.learner.observe(sample_id, pred.features, pred.confidence, pred.entropy, label, time.time())
        if why:
            self.agent.counters.reject("bad_label")

    async def on_feedback(self, env: Envelope, msg: Message) -> None:
        if self.learner is None:
            self.agent.reply(env, msg, {"ok": False, "error": "no trainable head on this device"})
            return
        why = self.learner.feedback(env.body["request_id"], env.body["label"], time.time())
        if why:
            self.agent.counters.reject("bad_feedback")
        self.agent.reply(env, msg, {"ok": why is None, **({"error": why} if why else {"labelled": self.learner.labelled})})

    async def on_global_head(self, frame: Any, msg: Message) -> None:
        """A new global head version from the controller (federated aggregate)."""
        from protocol.bundle import check_head

        engine = self.agent.serving.engine
        if engine is None or self.learner is None:
            return
        try:
            head = check_head(frame.tensors)
            engine.swap_head(head)
        except ValueError as exc:
            self.agent.counters.reject("bad_global_head")
            self.agent.emit_event("fl.head_refused", "warning", reason=str(exc))
            return
        self.learner.adopt_global(head)
        self.agent.emit_event("fl.head_applied", version=frame.envelope.body["version"],
                              run_id=frame.envelope.body.get("run_id"))

    async def run(self) -> None:
        """Check the trigger twice a second; train in a worker thread; swap adopted heads."""
        while True:
            await asyncio.sleep(0.5)
            lr = self.learner
            if lr is None:
                continue
            lr.expire(time.time())
            reason = lr.should_train(time.monotonic())
            if not reason:
                continue
            log.info("training cycle (%s)", reason)
            res = await asyncio.to_thread(lr.run_cycle)
            self.cycles += 1
            if res.adopted and res.head is not None:
                try:
                    self.agent.serving.engine.swap_head(res.head)
                except (AttributeError, ValueError) as exc:  # the model changed under us: drop the candidate
                    self.agent.emit_event("learning.rejected", "warning", reason=f"serving model changed: {exc}")
                    continue
                self.agent.emit_event("learning.adopted", head_version=lr.head_version, reason=res.reason,
                                      loss=res.loss, steps=res.steps)
            else:
                self.agent.counters.reject("candidate_refused")
                self.agent.emit_event("learning.rejected", "warning", reason=res.reason)

    def _cmd_start(self, args: dict, env: Envelope) -> dict:
        self.learner.enabled = True
        return {"enabled": True}

    def _cmd_stop(self, args: dict, env: Envelope) -> dict:
        self.learner.enabled = False
        return {"enabled": False}

    def _cmd_now(self, args: dict, env: Envelope) -> dict:
        self.learner.enabled = True
        self.learner.request()
        return {"requested": True, "labelled_samples": self.learner.buffer.train_size}
