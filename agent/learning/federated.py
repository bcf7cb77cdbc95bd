"""The agent's side of federated rounds.

On an ``fl.task`` (a signed frame carrying the global head) the agent trains the head
locally from that starting point on its own labelled features — in a worker thread,
so inference keeps running — and uploads only the delta (compressed when the task
asks), never raw data. ``fl.ack`` tells it whether the update was used.

The training itself is the learner's (``agent.learning``); this module is the glue
and the rules: one update per (run, round), no training past the deadline, the
delta's shape must match the global head.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
import json
import logging
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import numpy as np

from protocol import fl as fl_msgs  # noqa: F401 - registers fl.* kinds
from protocol.atomicfile import write_atomic
from protocol.binary import Frame, encode_frame
from protocol.envelope import Envelope
from protocol.mqttlink import Message

if TYPE_CHECKING:  # pragma: no cover
    from ..core.context import AgentContext

log = logging.getLogger("edge_agent.fl")

Head = dict[str, np.ndarray]


@dataclass(frozen=True)
class LocalResult:
    head: Head
    num_samples: int
    loss: float
    seconds: float
    steps: int


class LocalTrainer(Protocol):
    """What the learner offers to federated rounds."""

    def labelled_count(self) -> int: ...

    def train_from(self, start: Head, *, steps: int, lr: float, batch_size: int, prox_mu: float,
                   optimizer: str, budget_s: float, correction: Mapping[str, np.ndarray] | None = None,
                   frozen: tuple[str, ...] = ()) -> LocalResult: ...


class TaskRefused(Exception):
    pass


def check_task_head(global_head: Mapping[str, np.ndarray], local_shapes: Mapping[str, tuple[int, ...]]) -> None:
    if set(global_head) != set(local_shapes):
        raise TaskRefused(f"global head tensors {sorted(global_head)} != local head {sorted(local_shapes)}")
    for k, v in global_head.items():
        if tuple(v.shape) != tuple(local_shapes[k]):
            raise TaskRefused(f"{k}: global shape {list(v.shape)} != local {list(local_shapes[k])}")
        if not np.all(np.isfinite(v)):
            raise TaskRefused(f"{k}: global head holds NaN/inf")


def clip_delta(delta: Head, clip: float) -> tuple[Head, float]:
    """L2-clip the whole update to ``clip`` (DP-FedAvg's client step); returns (delta, original norm)."""
    norm = math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()))
    if clip > 0 and norm > clip:
        scale = clip / norm
        delta = {k: (v * scale).astype(np.float32) for k, v in delta.items()}
    return delta, norm


class Participant:
    """``local_shapes``: the tensors rounds federate (the bundle's trainable layers); ``full_head``
    (when only some layers are federated) gives the frozen ones the board trains on top of."""

    def __init__(self, ctx: "AgentContext", trainer: LocalTrainer, local_shapes: Mapping[str, tuple[int, ...]],
                 full_head: "Callable[[], Mapping[str, np.ndarray]] | None" = None, bundle_id: str = "") -> None:
        from .scaffold import ControlStore

        self.ctx = ctx
        self.trainer = trainer
        self.local_shapes = dict(local_shapes)
        self.full_head = full_head
        self.state_file = Path(ctx.cfg.state.dir) / "fl_rounds.json"
        self.controls = ControlStore(Path(ctx.cfg.state.dir) / "learning", bundle_id)
        self.done: dict[str, int] = self._load()
        self.stats = {"tasks": 0, "updates_sent": 0, "accepted": 0, "rejected": 0, "refused_tasks": 0}
        self.last_samples_per_s: float | None = None
        self.busy = False
        self._compressors: dict[str, Any] = {}
        #: "run#round" -> (topic, payload, deadline_ts) of updates the controller has not acked yet: a
        #: controller killed after the broker took our update, before it recorded or acked it, never
        #: answers, so we send the same bytes again every ``resend_s`` (it dedupes by run and round
        #: and answers a repeat with the verdict it recorded) until its ``fl.ack`` or the deadline
        #: plus ``resend_grace_s``
        self.unacked: dict[str, tuple[str, bytes, float]] = {}
        self.acked: dict[str, None] = {}     # keys answered (insertion order; the last 1024 kept)
        self.resend_s = 10.0
        self.resend_grace_s = 60.0
        self._resenders: set[asyncio.Task] = set()
        #: session -> (SecAggClient, the weighted update it masks): the update never leaves unmasked
        self.secure: dict[str, tuple[Any, np.ndarray]] = {}

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.state_file.read_text())
            return {str(k): int(v) for k, v in data.items()} if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _save(self) -> None:
        write_atomic(self.state_file, json.dumps(self.done))

    def telemetry(self) -> dict[str, Any]:
        return {"labelled_samples": self.trainer.labelled_count(), "samples_per_s": self.last_samples_per_s,
                "fl": dict(self.stats), "fl_busy": self.busy}

    # -- handlers ----------------------------------------------------------
    async def on_task(self, frame: Frame, msg: Message) -> None:
        b = frame.envelope.body
        key = f"{b['run_id']}#{b['round']}"
        self.stats["tasks"] += 1
        try:
            if self.done.get(key) is not None:
                raise TaskRefused(f"already trained for round {b['round']} of {b['run_id']}")
            if self.busy:
                raise TaskRefused("still training the previous task")
            budget = float(b["deadline_ts"]) - time.time()
            if budget <= 0.5:
                raise TaskRefused("task arrived after its deadline")
            scaffold = bool(b.get("scaffold"))
            if scaffold:
                from . import scaffold as sc

                try:
                    x, c_glob = sc.split_task(frame.tensors)
                except ValueError as exc:
                    raise TaskRefused(str(exc)) from None
            else:
                x, c_glob = dict(frame.tensors), {}
            check_task_head(x, self.local_shapes)
            if self.trainer.labelled_count() < 1:
                raise TaskRefused("no labelled samples on this device")
        except TaskRefused as exc:
            self.stats["refused_tasks"] += 1
            self.ctx.counters.reject("fl_task_refused")
            log.warning("refused fl task %s: %s", key, exc)
            self.ctx.emit_event("fl.task_refused", "warning", run_id=b["run_id"], round=b["round"], reason=str(exc))
            return
        self.done[key] = 0
        self._save()
        correction, ci = None, None
        if scaffold:
            ci, why = self.controls.load_or_reset(self.local_shapes)
            if why:   # corrupt, or for another bundle: SCAFFOLD restarts its own cᵢ from zeros
                self.ctx.counters.reject("scaffold_state_reset")
                log.warning("SCAFFOLD control variate reset: %s", why)
                self.ctx.emit_event("fl.scaffold_reset", "warning", reason=why)
            correction = sc.correction(c_glob, ci)
        start, frozen = dict(x), ()
        if self.full_head is not None:
            from protocol.layers import merge

            full = dict(self.full_head())
            start = merge(full, x)
            frozen = tuple(sorted(set(full) - set(x)))
        self.busy = True
        try:
            res = await asyncio.to_thread(self.trainer.train_from, start, steps=int(b["steps"]),
                                          lr=float(b["lr"]), batch_size=int(b["batch_size"]),
                                          prox_mu=float(b.get("prox_mu", 0.0)),
                                          optimizer=str(b.get("optimizer") or "sgd"), budget_s=budget * 0.8,
                                          correction=correction, frozen=frozen)
        finally:
            self.busy = False
        if res.seconds > 0:
            self.last_samples_per_s = round(res.steps * int(b["batch_size"]) / res.seconds, 2)
        y = {k: res.head[k].astype(np.float32) for k in x}
        if scaffold:
            momentum = float(getattr(getattr(self.trainer, "cfg", None), "momentum", 0.0) or 0.0)
            ci_new, dci = sc.new_control(x, y, c_glob, ci, max(1, res.steps), float(b["lr"]) / (1 - momentum))
            delta = sc.update_tensors(x, y, dci)
        else:
            delta = {k: (y[k] - x[k].astype(np.float32)) for k in x}
        dp = b.get("dp") or {}
        delta, norm = clip_delta(delta, float(dp.get("clip", 0.0)))
        if b.get("secagg"):
            self._start_secure(b, delta, res)
        else:
            self._send_update(b, delta, res, norm)
        if scaffold:
            self.controls.save(ci_new)   # after the update is in the outbox: cᵢ moves with what we sent
        self.done[key] = 1
        self._save()

    def _send_update(self, task: Mapping[str, Any], delta: Head, res: LocalResult, norm: float) -> None:
        body = {"run_id": task["run_id"], "round": int(task["round"]), "base_version": int(task["base_version"]),
                "num_samples": int(res.num_samples), "steps": int(res.steps), "train_loss": float(res.loss),
                "train_time_s": round(res.seconds, 4), "samples_per_s": self.last_samples_per_s or 0.0,
                "update_norm": round(norm, 6)}
        comp = task.get("compression") or {}
        if comp:
            from protocol.compression import Compressor

            try:
                c = self._compressors.get(task["run_id"]) or Compressor.from_config(comp)
                self._compressors[task["run_id"]] = c
                blob = c.encode(delta)
            except ValueError as exc:  # bad settings in the task, or a non-finite delta
                self.stats["refused_tasks"] += 1
                self.ctx.counters.reject("fl_task_refused")
                self.ctx.emit_event("fl.task_refused", "warning", run_id=task["run_id"], round=task["round"],
                                      reason=f"cannot compress the update: {exc}")
                return
            env = Envelope(kind="fl.update", sender=self.ctx.device_id, body={**body, "encoding": "compressed"})
            payload = encode_frame(env, None, blob)
        else:
            env = Envelope(kind="fl.update", sender=self.ctx.device_id, body={**body, "encoding": "raw"})
            payload = encode_frame(env, delta)
        topic = self.ctx.topics.data(self.ctx.device_id, "fl")
        self.ctx.publish_reliable("update", topic, payload, qos=1)
        key = f"{task['run_id']}#{task['round']}"
        self.unacked[key] = (topic, payload, float(task["deadline_ts"]))
        t = asyncio.ensure_future(self._resend(key))
        self._resenders.add(t)
        t.add_done_callback(self._resenders.discard)
        self.stats["updates_sent"] += 1
        log.info("fl update for %s#%s: %d samples, loss %.4f, %d bytes", task["run_id"], task["round"],
                 res.num_samples, res.loss, len(payload))

    # -- secure aggregation (protocol.secagg): the update leaves the board only masked ------------
    def _publish_secagg(self, m: Any) -> None:
        from protocol.secagg_wire import KIND, to_wire

        body, tensors = to_wire(m)
        env = Envelope(kind=KIND, sender=self.ctx.device_id, body=body)
        self.ctx.publish(self.ctx.topics.data(self.ctx.device_id, "fl"), encode_frame(env, tensors), 1)

    def _start_secure(self, task: Mapping[str, Any], delta: Head, res: LocalResult) -> None:
        from protocol.secagg import SecAggClient
        from protocol.secagg_wire import flatten

        session = str(task["secagg"]["session"])
        client = SecAggClient(session, self.ctx.device_id)
        self.secure = {session: (client, flatten(delta, int(res.num_samples)))}   # one session at a time
        self.stats["updates_sent"] += 1
        self._publish_secagg(client.advertise())
        log.info("fl update for %s kept on the board: secure aggregation session %s", task["run_id"], session)

    async def on_secagg(self, env: Envelope, msg: Message) -> None:
        """The controller's next stage of a secure session: answer it, or refuse it with the reason."""
        from protocol.secagg import SecAggError
        from protocol.secagg_wire import from_wire

        b = env.body
        session = str(b.get("session"))
        item = self.secure.get(session)
        try:
            if b.get("stage") == "refused":
                raise SecAggError(f"the controller refused our message: {b.get('reason')}")
            if item is None:
                raise SecAggError(f"no secure session {session!r} on this device")
            client, vector = item
            m = from_wire(b)
            stage = b.get("stage")
            if stage == "roster":
                self._publish_secagg(client.on_roster(m))
            elif stage == "inbox":
                self._publish_secagg(client.on_inbox(m, vector))
            elif stage == "unmask":
                self._publish_secagg(client.on_unmask(m))
                self.secure.pop(session, None)
            else:
                raise SecAggError(f"stage {stage!r} is not sent by the controller")
        except SecAggError as exc:
            self.ctx.counters.reject("secagg_refused")
            log.warning("secure aggregation %s: %s", session, exc.reason)
            self.ctx.emit_event("fl.secagg_refused", "warning", session=session, reason=exc.reason)

    async def _resend(self, key: str) -> None:
        while key in self.unacked:
            await asyncio.sleep(self.resend_s)
            item = self.unacked.get(key)
            if item is None:
                return
            topic, payload, deadline = item
            if time.time() > deadline + self.resend_grace_s:
                self.unacked.pop(key, None)
                log.warning("fl update for %s never acknowledged by the controller; giving up", key)
                return
            if self.ctx.connected and self.ctx.publish(topic, payload, 1):
                log.info("fl update for %s not acknowledged yet: sent again", key)

    async def on_ack(self, env: Envelope, msg: Message) -> None:
        b = env.body
        key = f"{b['run_id']}#{b['round']}"
        self.unacked.pop(key, None)
        if key in self.acked:
            return   # a restarted controller acks again what a crash may have lost: count it once
        self.acked[key] = None
        while len(self.acked) > 1024:
            del self.acked[next(iter(self.acked))]
        if b["accepted"]:
            self.stats["accepted"] += 1
        else:
            self.stats["rejected"] += 1
            log.warning("controller rejected our update for %s#%s: %s", b["run_id"], b["round"], b["reason"])
        self.ctx.emit_event("fl.update_" + ("accepted" if b["accepted"] else "rejected"),
                              "info" if b["accepted"] else "warning", run_id=b["run_id"], round=b["round"],
                              reason=b["reason"])
