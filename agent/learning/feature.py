"""The learning feature: on-device fine-tuning of the head and federated rounds, wired in.

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
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import numpy as np

from protocol.envelope import Envelope
from protocol.mqttlink import Message

from ..core.context import AgentContext, Feature
from .learner import LearnConfig, Learner

if TYPE_CHECKING:  # pragma: no cover
    from ..serving.inference import InferenceEngine, Prediction

log = logging.getLogger("edge_agent.learning")


def _reference_stats(engine: Any) -> tuple[float, float]:
    ref = engine.bundle.npz("reference") or engine.bundle.npz("eval")
    if ref is None:
        return 1.0, 0.0
    preds = [engine.predict(x) for x in ref["x"][:64]]
    return float(np.mean([p.confidence for p in preds])), float(np.mean([p.entropy for p in preds]))


class ServingPort(Protocol):
    """What learning needs of serving: the engine (its head is swapped), and every served prediction."""

    engine: "InferenceEngine | None"
    observers: "list[Callable[[str, Prediction, int | None], None]]"


class Adaptation(Feature):
    """Declares ``learn.*``, the ``feedback`` request and, when federated, ``fl.task``/``fl.ack``/``fl.head``
    — only when the serving bundle has a trainable head (declarations are read after ``start``)."""

    name = "learning"

    def __init__(self, ctx: AgentContext, serving: ServingPort) -> None:
        self.ctx = ctx
        self.serving = serving
        self.learner: Learner | None = None
        self.participant: Any = None
        self.cycles = 0
        self.personal: dict[str, Any] = {}   # the gate's last choice and both accuracies (telemetry)

    # -- declarations ----------------------------------------------------------
    def commands(self) -> dict[str, Any]:
        if self.learner is None:
            return {}
        lr = self.learner
        return {"learn.start": self._cmd_start, "learn.stop": self._cmd_stop, "learn.now": self._cmd_now,
                "learn.status": lambda a, e: lr.status()}

    def request_kinds(self) -> dict[str, Any]:
        return {"feedback": self.on_feedback} if self.learner is not None else {}

    def control_kinds(self) -> dict[str, Any]:
        if self.participant is None:
            return {}
        from protocol import secagg_wire  # noqa: F401 - registers fl.secagg

        return {"fl.task": self.participant.on_task, "fl.ack": self.participant.on_ack,
                "fl.head": self.on_global_head, "fl.secagg": self.participant.on_secagg}

    def telemetry(self) -> dict[str, Any] | None:
        if self.learner is None:
            return None
        st = self.learner.status()
        if self.personal:
            st["personalization"] = dict(self.personal)
        return st

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [("learning", self.run)] if self.learner is not None else []

    def start(self) -> None:
        """Build the learner for the serving bundle (if it has a head) and restore its checkpoint."""
        engine = self.serving.engine
        cfg = self.ctx.cfg.learning
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
                          Path(self.ctx.cfg.state.dir) / "learning", engine.bundle.id, conf, ent)
        why = learner.load_checkpoint()
        if why is None:
            engine.swap_head(learner.head)
            log.info("restored head v%d from checkpoint", learner.head_version)
            self.ctx.emit_event("learning.restored", head_version=learner.head_version)
        learner.enabled = cfg.enabled
        self.learner = learner
        self.serving.observers.append(self._observe)
        if cfg.federated:
            from protocol.layers import LayerError, trainable_tensors

            from .federated import Participant

            try:
                names = trainable_tensors(engine.bundle.manifest.raw, learner.head)
            except LayerError as exc:   # a bundle that declares layers its head does not have: no rounds
                log.error("not taking part in federated rounds: %s", exc)
                self.ctx.emit_event("fl.refused", "error", reason=str(exc))
                return
            partial = set(names) != set(learner.head)
            self.participant = Participant(self.ctx, learner, {k: learner.shapes[k] for k in names},
                                           full_head=(lambda: learner.head) if partial else None,
                                           bundle_id=engine.bundle.id)
            if cfg.personalize:
                self._restore_personal()

    def _observe(self, sample_id: str, pred: Any, label: int | None) -> None:
        assert self.learner is not None
        why = self.learner.observe(sample_id, pred.features, pred.confidence, pred.entropy, label, time.time())
        if why:
            self.ctx.counters.reject("bad_label")

    async def on_feedback(self, env: Envelope, msg: Message) -> None:
        if self.learner is None:
            self.ctx.reply(env, msg, {"ok": False, "error": "no trainable head on this device"})
            return
        why = self.learner.feedback(env.body["request_id"], env.body["label"], time.time())
        if why:
            self.ctx.counters.reject("bad_feedback")
        self.ctx.reply(env, msg, {"ok": why is None, **({"error": why} if why else {"labelled": self.learner.labelled})})

    async def on_global_head(self, frame: Any, msg: Message) -> None:
        """A new global head version from the controller (federated aggregate): the federated
        layers, put back on the frozen ones; with ``personalize``, the board's own last layer is
        fine-tuned from it and served only if it beats the global head on the holdout."""
        from protocol.bundle import check_head
        from protocol.layers import merge

        engine = self.serving.engine
        if engine is None or self.learner is None:
            return
        try:
            head = check_head(merge(self.learner.head, frame.tensors))
            self.learner.adopt_global(head)
            if self.ctx.cfg.learning.personalize:
                head = await asyncio.to_thread(self._personalize, head)
            engine.swap_head(head)
        except ValueError as exc:
            self.ctx.counters.reject("bad_global_head")
            self.ctx.emit_event("fl.head_refused", "warning", reason=str(exc))
            return
        self.ctx.emit_event("fl.head_applied", version=frame.envelope.body["version"],
                              run_id=frame.envelope.body.get("run_id"), serving=self.personal.get("serve", "global"))

    # -- personalization (FedPer) ------------------------------------------------
    def _personal_store(self):
        from .personal import PersonalStore

        return PersonalStore(Path(self.ctx.cfg.state.dir) / "learning", self.serving.engine.bundle.id)

    def _personalize(self, global_head: dict) -> dict:
        """Worker thread: fine-tune the last layer, gate on the holdout, keep the personal layer."""
        from .personal import last_layer, personalize
        from .trainer import TrainConfig

        lr = self.learner
        assert lr is not None
        x, y = lr.buffer.train_view()
        hx, hy = lr.buffer.holdout_view()
        if len(y) < 1 or len(hy) < 1:
            self.personal = {"serve": "global", "reason": "no labelled/held-out samples yet"}
            return global_head
        c = self.ctx.cfg.learning
        head, choice = personalize(global_head, x, y, hx, hy, c.personal_steps,
                                   TrainConfig(lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                                               batch_size=c.batch_size))
        last = last_layer(head)
        if choice.serve == "personal":
            self._personal_store().save({k: v for k, v in head.items() if k.startswith(last + ".")})
        self.personal = {"serve": choice.serve, "global_accuracy": round(choice.global_acc, 4),
                         "personal_accuracy": round(choice.personal_acc, 4)}
        return head

    def _restore_personal(self) -> None:
        """At start: the personal layer kept for this bundle, if any (refused with the reason otherwise)."""
        from .personal import PersonalHeadError

        lr, engine = self.learner, self.serving.engine
        try:
            layer = self._personal_store().load(lr.head)
        except PersonalHeadError as exc:
            self.ctx.counters.reject("personal_head_refused")
            log.warning("personal head refused: %s", exc)
            self.ctx.emit_event("fl.personal_refused", "warning", reason=str(exc))
            self.personal = {"serve": "global", "reason": str(exc)}
            return
        if layer is not None:
            engine.swap_head({**lr.head, **layer})
            self.personal = {"serve": "personal", "restored": True}

    async def run(self) -> None:
        """Check the trigger twice a second; train in a worker thread; swap adopted heads."""
        while True:
            await asyncio.sleep(0.5)
            lr = self.learner
            if lr is None:
                return
            lr.expire(time.time())
            reason = lr.should_train(time.monotonic())
            if not reason:
                continue
            log.info("training cycle (%s)", reason)
            res = await asyncio.to_thread(lr.run_cycle)
            self.cycles += 1
            if res.adopted and res.head is not None:
                try:
                    self.serving.engine.swap_head(res.head)
                except (AttributeError, ValueError) as exc:  # the model changed under us: drop the candidate
                    self.ctx.emit_event("learning.rejected", "warning", reason=f"serving model changed: {exc}")
                    continue
                self.ctx.emit_event("learning.adopted", head_version=lr.head_version, reason=res.reason,
                                      loss=res.loss, steps=res.steps)
            else:
                self.ctx.counters.reject("candidate_refused")
                self.ctx.emit_event("learning.rejected", "warning", reason=res.reason)

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
