"""On-device learning: collect labelled features, train a candidate head, adopt it only if
it is not worse on held-out data, and keep it across restarts.

The learner is driven from outside: ``observe``/``feedback`` from the agent's loop thread,
``run_cycle`` from a worker thread (never the loop), ``status`` for telemetry. Inference
keeps the last good head; a new one is handed back and swapped atomically by the caller.
Checkpoints (head, replay buffer and counters in one file, ``checkpoint.py``) are written
by atomic rename and are only restored onto the bundle they were trained for. The
decisions — when to train, whether to adopt — are pure functions in ``policy.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from .drift import DriftConfig, DriftMonitor
from .pending import PendingLabels
from .policy import TRIGGERS, TriggerState, decide_adoption, head_is_finite, trigger_reason
from .replay import FeatureBuffer
from .trainer import HeadTrainer, TrainConfig, accuracy

Head = dict[str, np.ndarray]


@dataclass(frozen=True)
class LearnConfig:
    trigger: str = "every_n"          # every_n | drift | command
    every_n: int = 50                 # labelled samples between cycles
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_steps: int = 200              # per cycle
    budget_s: float = 2.0             # wall time per cycle
    cpu_fraction: float = 0.25        # training time / wall time, at most (also paces each cycle)
    buffer_bytes: int = 2 << 20
    policy: str = "class_balanced"
    holdout_every: int = 5
    holdout_split: str = "every_k"    # every_k | hash (of the sample/request id)
    min_holdout: int = 10
    min_train: int = 20
    adopt_margin: float = 0.0         # candidate may be at most this much worse (0: not worse)
    pending_max: int = 2048
    pending_ttl_s: float = 600.0
    isolate: str = "process"          # process: train in a short-lived child (no GIL contention with
                                      # inference); thread: in the caller's thread (less memory)
    drift: DriftConfig = field(default_factory=DriftConfig)

    def __post_init__(self) -> None:
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger must be every_n, drift or command, got {self.trigger!r}")
        if not (0 < self.cpu_fraction <= 1):
            raise ValueError("cpu_fraction must be in (0, 1]")
        if self.holdout_split not in ("every_k", "hash"):
            raise ValueError(f"holdout_split must be every_k or hash, got {self.holdout_split!r}")
        if self.isolate not in ("process", "thread"):
            raise ValueError(f"isolate must be process or thread, got {self.isolate!r}")


@dataclass(frozen=True)
class CycleResult:
    adopted: bool
    reason: str
    head: Head | None             # the new head when adopted, else None
    loss: float | None
    acc_before: float | None      # holdout accuracy of the serving head
    acc_after: float | None       # holdout accuracy of the candidate
    steps: int
    seconds: float

    @property
    def new_head(self) -> Head | None:
        return self.head

    @property
    def holdout_acc_before(self) -> float | None:
        return self.acc_before

    @property
    def holdout_acc_after(self) -> float | None:
        return self.acc_after


def _train_candidate(start, tcfg, x, y, steps, budget_s, cpu_fraction, correction=None, frozen=()):
    """Train a copy of ``start``; top-level so a child process can run it. ``correction`` is added to
    every gradient (SCAFFOLD), ``frozen`` tensors are not stepped (layers a bundle does not federate)."""
    trainer = HeadTrainer(start, tcfg, correction=correction, frozen=set(frozen))
    rep = trainer.train(x, y, steps, budget_s, cpu_fraction=cpu_fraction)
    return trainer.head(), rep


class Learner:
    def __init__(self, head: Mapping[str, np.ndarray], n_classes: int, cfg: LearnConfig, state_dir: str | Path,
                 bundle_id: str, ref_confidence: float = 1.0, ref_entropy: float = 0.0,
                 ref_confidences: np.ndarray | None = None, started: float | None = None) -> None:
        self.cfg = cfg
        self.n_classes = n_classes
        self.dim = int(head["dense0.weight"].shape[0])
        self.bundle_id = bundle_id
        self.dir = Path(state_dir)
        self.head: Head = {k: np.array(v, np.float32) for k, v in head.items()}
        self.shapes = {k: v.shape for k, v in self.head.items()}
        self.head_version = 0
        self.buffer = FeatureBuffer(self.dim, n_classes, cfg.buffer_bytes, cfg.policy, cfg.holdout_every,
                                    split=cfg.holdout_split)
        self.pending = PendingLabels(cfg.pending_max, cfg.pending_ttl_s)
        self.drift = DriftMonitor(ref_confidence, ref_entropy, cfg.drift, ref_confidences)
        self.enabled = True
        self.samples_seen = 0
        self.labelled = 0
        self._since_cycle = 0
        self._requested = False
        self._busy = threading.Lock()
        self.last: CycleResult | None = None
        self.cycles = {"adopted": 0, "rejected": 0}
        self.rejects: dict[str, int] = {}
        self.last_samples_per_s: float | None = None
        self.child_peak_rss_mb: float | None = None
        self._train_time = 0.0
        self._t_started = time.monotonic() if started is None else started
        self.restore_note: str | None = None   # set when a checkpoint was restored only in part

    # -- inputs (loop thread) ---------------------------------------------
    def _reject(self, why: str) -> str:
        key = why.split(":")[0]
        self.rejects[key] = self.rejects.get(key, 0) + 1
        return why

    def observe(self, sample_id: str, features: np.ndarray, confidence: float, entropy: float,
                label: int | None, now: float) -> str | None:
        """One served inference. Labelled: into the buffer. Unlabelled: kept for later feedback.
        Returns None, or why the sample was not kept."""
        self.samples_seen += 1
        self.drift.observe(confidence, entropy)
        if label is None:
            try:
                self.pending.put(sample_id, features, now)
            except ValueError as exc:
                return self._reject(f"bad_request_id: {exc}")
            return None
        return self._add(features, label, sample_id)

    def _add(self, features: np.ndarray, label: Any, sample_id: str | None) -> str | None:
        why = self.buffer.add(features, label, sample_id)
        if why:
            return self._reject(why)
        self.labelled += 1
        self._since_cycle += 1
        return None

    def feedback(self, request_id: str, label: Any, now: float) -> str | None:
        """A label for an earlier request; None when taken, else the reason it was not."""
        claim = self.pending.take(request_id, now)
        if claim.features is None:
            return self._reject(claim.reason or "unknown_request")
        return self._add(claim.features, label, request_id)

    def expire(self, now: float) -> int:
        return self.pending.expire(now)

    def request(self) -> None:
        self._requested = True

    def trigger_state(self, now: float) -> TriggerState:
        elapsed = max(1e-9, now - self._t_started)
        return TriggerState(enabled=self.enabled, busy=self._busy.locked(), train_size=self.buffer.train_size,
                            holdout_size=self.buffer.holdout_size, since_cycle=self._since_cycle,
                            requested=self._requested, drifting=self.drift.drifting, drift_score=self.drift.score,
                            cpu_share=self._train_time / elapsed)

    def should_train(self, now: float) -> str | None:
        """The reason to run a cycle now (``now``: the monotonic clock), or None."""
        c = self.cfg
        return trigger_reason(self.trigger_state(now), trigger=c.trigger, every_n=c.every_n, min_train=c.min_train,
                              min_holdout=c.min_holdout, cpu_fraction=c.cpu_fraction)

    # -- training (worker thread) -----------------------------------------
    def _train_cfg(self, **over: Any) -> TrainConfig:
        c = self.cfg
        base = dict(optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                    batch_size=c.batch_size, seed=self.head_version)
        base.update(over)
        return TrainConfig(**base)

    def run_cycle(self, max_steps: int | None = None, budget_s: float | None = None) -> CycleResult:
        """Train a candidate from the current head; adopt it only if it is not worse on the holdout."""
        with self._busy:
            self._requested = False
            self._since_cycle = 0
            x, y = self.buffer.train_view()
            hx, hy = self.buffer.holdout_view()
            t0 = time.perf_counter()
            if len(y) == 0:
                return self._finish(False, "no labelled training samples", None, None, None, None, 0, t0)
            steps = self.cfg.max_steps if max_steps is None else max_steps
            budget = self.cfg.budget_s if budget_s is None else budget_s
            try:
                cand, rep = self._train(self.head, self._train_cfg(), x, y, steps, budget)
            except FloatingPointError as exc:
                return self._finish(False, f"training diverged: {exc}", None, None, None, None, 0, t0)
            if rep.seconds > 0:
                self.last_samples_per_s = rep.samples_per_s
            finite = head_is_finite(cand) and math.isfinite(rep.loss)
            before = accuracy(self.head, hx, hy)
            after = accuracy(cand, hx, hy) if finite else float("nan")
            d = decide_adoption(before, after, len(hy), min_holdout=self.cfg.min_holdout,
                                margin=self.cfg.adopt_margin, finite=finite)
            if not d.adopt:
                return self._finish(False, d.reason, None, rep.loss, _num(before), _num(after), rep.steps, t0)
            self.head = cand
            self.head_version += 1
            self.drift.rebase()
            res = self._finish(True, d.reason, cand, rep.loss, before, after, rep.steps, t0)
            self.save_checkpoint()
            return res

    def _finish(self, adopted, reason, head, loss, before, after, steps, t0) -> CycleResult:
        secs = time.perf_counter() - t0
        self._train_time += secs
        self.cycles["adopted" if adopted else "rejected"] += 1
        if not adopted:
            self._reject(reason)
        self.last = CycleResult(adopted, reason, head, loss, before, after, steps, secs)
        return self.last

    # federated rounds: train from a given start head on local data (the serving head is untouched)
    def labelled_count(self) -> int:
        return self.buffer.train_size

    def train_from(self, start: Mapping[str, np.ndarray], *, steps: int, lr: float, batch_size: int,
                   prox_mu: float, optimizer: str, budget_s: float,
                   correction: Mapping[str, np.ndarray] | None = None, frozen: tuple[str, ...] = ()):
        from .federated import LocalResult

        with self._busy:
            x, y = self.buffer.train_view()
            head, rep = self._train(start, self._train_cfg(lr=lr, batch_size=batch_size, prox_mu=prox_mu,
                                                           optimizer=optimizer), x, y, steps, budget_s,
                                    correction=correction, frozen=frozen)
            self._train_time += rep.seconds
            if rep.seconds > 0:
                self.last_samples_per_s = rep.samples_per_s
            return LocalResult(head, len(y), rep.loss, rep.seconds, rep.steps)

    def _train(self, start: Mapping[str, np.ndarray], tcfg: TrainConfig, x: np.ndarray, y: np.ndarray, steps: int,
               budget_s: float, correction: Mapping[str, np.ndarray] | None = None, frozen: tuple[str, ...] = ()):
        args = (dict(start), tcfg, x, y, steps, budget_s, self.cfg.cpu_fraction,
                dict(correction) if correction else None, tuple(frozen))
        if self.cfg.isolate == "thread":
            return _train_candidate(*args)
        import pickle
        import subprocess
        import sys

        # a short-lived child: true parallelism with inference; only numpy + the trainer load in it,
        # and its memory goes back to the board when the cycle ends
        pkg_root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": pkg_root + os.pathsep + os.environ.get("PYTHONPATH", "")}
        proc = subprocess.run([sys.executable, "-m", "agent.learning.child"], input=pickle.dumps(args),
                              capture_output=True, timeout=budget_s + 60, env=env, check=False)
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
            last = err[-1] if err else f"exit code {proc.returncode}"
            if "FloatingPointError" in last:
                raise FloatingPointError(last)
            raise RuntimeError(f"training child failed: {last}")
        head, rep, self.child_peak_rss_mb = pickle.loads(proc.stdout)
        return head, rep

    def adopt_global(self, head: Mapping[str, np.ndarray]) -> None:
        """A new global head from a federated round becomes the learner's base."""
        self.head = {k: np.array(v, np.float32) for k, v in head.items()}
        self.head_version += 1
        self.save_checkpoint()

    # -- persistence -------------------------------------------------------
    def save_checkpoint(self, directory: str | Path | None = None) -> Path:
        """Head, replay buffer and counters in one file, replaced atomically (``checkpoint.py``)."""
        meta = {"bundle_id": self.bundle_id, "head_version": self.head_version, "samples_seen": self.samples_seen,
                "labelled": self.labelled, "since_cycle": self._since_cycle, "cycles": dict(self.cycles),
                "replay_policy": self.cfg.policy, "saved": time.time()}
        return write_checkpoint(self.dir if directory is None else directory, self.head, meta, self.buffer.state())

    def load_checkpoint(self, directory: str | Path | None = None) -> str | None:
        """Restore a saved head (and buffer) trained on this bundle; returns why not, or None when restored."""
        try:
            head, meta, replay = read_checkpoint(self.dir if directory is None else directory)
        except CheckpointError as exc:
            return str(exc)
        if meta.get("bundle_id") != self.bundle_id:
            return "checkpoint belongs to another bundle"
        if {k: v.shape for k, v in head.items()} != self.shapes:
            return "checkpoint head shape does not match the bundle"
        self.restore_note = None
        if replay:
            fresh = FeatureBuffer(self.dim, self.n_classes, self.cfg.buffer_bytes, self.cfg.policy,
                                  self.cfg.holdout_every, split=self.cfg.holdout_split)
            try:
                fresh.load_state(replay)
                self.buffer = fresh
            except (KeyError, ValueError, IndexError) as exc:
                self.restore_note = f"replay buffer not restored: {exc}"
                self._reject(f"checkpoint_replay: {exc}")
        self.head = head
        try:
            self.head_version = int(meta.get("head_version", 0))
            self.samples_seen = int(meta.get("samples_seen", 0))
            self.labelled = int(meta.get("labelled", 0))
            self._since_cycle = int(meta.get("since_cycle", 0))
            self.cycles.update({k: int(v) for k, v in (meta.get("cycles") or {}).items() if k in self.cycles})
        except (TypeError, ValueError, AttributeError):
            pass  # counters are informative only; the head is what matters
        return None

    def status(self) -> dict[str, Any]:
        last = self.last
        return {"enabled": self.enabled, "trigger": self.cfg.trigger, "head_version": self.head_version,
                "samples_seen": self.samples_seen, "labelled": self.labelled,
                "labelled_samples": self.buffer.train_size, "buffer": self.buffer.stats(),
                "pending_labels": len(self.pending), "cycles": dict(self.cycles),
                "train_loss": None if last is None or last.loss is None else round(last.loss, 5),
                "holdout_accuracy": None if last is None or last.acc_after is None else round(
                    last.acc_after if last.adopted else last.acc_before, 4),
                "last_cycle": None if last is None else {"adopted": last.adopted, "reason": last.reason,
                                                         "steps": last.steps, "seconds": round(last.seconds, 3)},
                "samples_per_s": None if self.last_samples_per_s is None else round(self.last_samples_per_s, 1),
                "trainer_peak_rss_mb": self.child_peak_rss_mb,
                "drift": self.drift.status(), "rejected": dict(self.rejects)}


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else v
