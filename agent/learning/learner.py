"""On-device learning: collect labelled features, train a candidate head, adopt it only if
it is not worse on held-out data, and keep it across restarts.

The learner is driven from outside: ``observe``/``feedback`` from the agent's loop thread,
``run_cycle`` from a worker thread (never the loop), ``status`` for telemetry. Inference
keeps the last good head; a new one is handed back and swapped atomically by the caller.
Checkpoints (head + meta) are written by atomic rename and are only restored onto the
bundle they were trained for.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .drift import DriftConfig, DriftMonitor
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
    min_holdout: int = 10
    min_train: int = 20
    adopt_margin: float = 0.0         # candidate may be at most this much worse (0: not worse)
    pending_max: int = 2048
    pending_ttl_s: float = 600.0
    isolate: str = "process"          # process: train in a short-lived child (no GIL contention with
                                      # inference); thread: in the caller's thread (less memory)
    drift: DriftConfig = field(default_factory=DriftConfig)

    def __post_init__(self) -> None:
        if self.trigger not in ("every_n", "drift", "command"):
            raise ValueError(f"trigger must be every_n, drift or command, got {self.trigger!r}")
        if not (0 < self.cpu_fraction <= 1):
            raise ValueError("cpu_fraction must be in (0, 1]")
        if self.isolate not in ("process", "thread"):
            raise ValueError(f"isolate must be process or thread, got {self.isolate!r}")


@dataclass(frozen=True)
class CycleResult:
    adopted: bool
    reason: str
    head: Head | None
    loss: float | None
    acc_before: float | None
    acc_after: float | None
    steps: int
    seconds: float


def _train_candidate(start, tcfg, x, y, steps, budget_s, cpu_fraction):
    """Train a copy of ``start``; top-level so a child process can run it."""
    trainer = HeadTrainer(start, tcfg)
    rep = trainer.train(x, y, steps, budget_s, cpu_fraction=cpu_fraction)
    return trainer.head(), rep


class Learner:
    def __init__(self, head: Mapping[str, np.ndarray], n_classes: int, cfg: LearnConfig, state_dir: str | Path,
                 bundle_id: str, ref_confidence: float = 1.0, ref_entropy: float = 0.0) -> None:
        self.cfg = cfg
        self.n_classes = n_classes
        self.dim = int(head["dense0.weight"].shape[0])
        self.bundle_id = bundle_id
        self.dir = Path(state_dir)
        self.head: Head = {k: np.array(v, np.float32) for k, v in head.items()}
        self.shapes = {k: v.shape for k, v in self.head.items()}
        self.head_version = 0
        self.buffer = FeatureBuffer(self.dim, n_classes, cfg.buffer_bytes, cfg.policy, cfg.holdout_every)
        self.pending: OrderedDict[str, tuple[np.ndarray, float]] = OrderedDict()
        self.drift = DriftMonitor(ref_confidence, ref_entropy, cfg.drift)
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
        self._t_started = time.monotonic()

    # -- inputs (loop thread) ---------------------------------------------
    def _reject(self, why: str) -> str:
        key = why.split(":")[0]
        self.rejects[key] = self.rejects.get(key, 0) + 1
        return why

    def observe(self, sample_id: str, features: np.ndarray, confidence: float, entropy: float,
                label: int | None, now: float) -> str | None:
        """One served inference. Labelled: into the buffer. Unlabelled: kept for later feedback."""
        self.samples_seen += 1
        self.drift.observe(confidence, entropy)
        if label is None:
            self.pending[sample_id] = (np.asarray(features, np.float32).reshape(-1).copy(), now)
            while len(self.pending) > self.cfg.pending_max:
                self.pending.popitem(last=False)
            return None
        return self._add(features, label)

    def _add(self, features: np.ndarray, label: Any) -> str | None:
        why = self.buffer.add(features, label)
        if why:
            return self._reject(why)
        self.labelled += 1
        self._since_cycle += 1
        return None

    def feedback(self, request_id: str, label: Any, now: float) -> str | None:
        """A label for an earlier request; None when taken, else the reason it was not."""
        item = self.pending.pop(request_id, None)
        if item is None:
            return self._reject(f"unknown_request: no pending features for request {request_id!r} "
                                "(never seen, already labelled, or expired)")
        feats, t = item
        if now - t > self.cfg.pending_ttl_s:
            return self._reject(f"expired: request {request_id!r} is older than {self.cfg.pending_ttl_s:g}s")
        return self._add(feats, label)

    def expire(self, now: float) -> None:
        while self.pending:
            k, (_, t) = next(iter(self.pending.items()))
            if now - t <= self.cfg.pending_ttl_s:
                break
            self.pending.popitem(last=False)

    def request(self) -> None:
        self._requested = True

    def should_train(self, now: float) -> str | None:
        if not self.enabled or self._busy.locked():
            return None
        if self.buffer.train_size < self.cfg.min_train or self.buffer.holdout_size < self.cfg.min_holdout:
            return None
        elapsed = max(1e-9, now - self._t_started)
        if self._train_time / elapsed > self.cfg.cpu_fraction:
            return None
        if self._requested:
            return "command"
        if self.cfg.trigger == "every_n" and self._since_cycle >= self.cfg.every_n:
            return f"{self._since_cycle} new labelled samples"
        if self.cfg.trigger == "drift" and self.drift.drifting and self._since_cycle >= self.cfg.min_train:
            return f"drift score {self.drift.score:.2f}"
        return None

    # -- training (worker thread) -----------------------------------------
    def _train_cfg(self, **over: Any) -> TrainConfig:
        c = self.cfg
        base = dict(optimizer=c.optimizer, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay,
                    batch_size=c.batch_size, seed=self.head_version)
        base.update(over)
        return TrainConfig(**base)

    def run_cycle(self) -> CycleResult:
        """Train a candidate from the current head; adopt it only if it is not worse on the holdout."""
        with self._busy:
            self._requested = False
            self._since_cycle = 0
            x, y = self.buffer.train_view()
            hx, hy = self.buffer.holdout_view()
            t0 = time.perf_counter()
            try:
                cand, rep = self._train(self.head, self._train_cfg(), x, y, self.cfg.max_steps, self.cfg.budget_s)
            except FloatingPointError as exc:
                return self._finish(False, f"training diverged: {exc}", None, None, None, None, 0, t0)
            if not all(np.isfinite(v).all() for v in cand.values()) or not math.isfinite(rep.loss):
                return self._finish(False, "candidate head has NaN/inf", None, rep.loss, None, None, rep.steps, t0)
            if rep.seconds > 0:
                self.last_samples_per_s = rep.samples_per_s
            before, after = accuracy(self.head, hx, hy), accuracy(cand, hx, hy)
            if after + 1e-12 < before - self.cfg.adopt_margin:
                return self._finish(False, f"candidate holdout accuracy {after:.3f} < current {before:.3f}",
                                    None, rep.loss, before, after, rep.steps, t0)
            self.head = cand
            self.head_version += 1
            self.drift.rebase()
            self.save_checkpoint()
            return self._finish(True, f"holdout accuracy {before:.3f} → {after:.3f}", cand, rep.loss, before, after,
                                rep.steps, t0)

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
                   prox_mu: float, optimizer: str, budget_s: float):
        from agent.federated import LocalResult

        with self._busy:
            x, y = self.buffer.train_view()
            head, rep = self._train(start, self._train_cfg(lr=lr, batch_size=batch_size, prox_mu=prox_mu,
                                                           optimizer=optimizer), x, y, steps, budget_s)
            self._train_time += rep.seconds
            if rep.seconds > 0:
                self.last_samples_per_s = rep.samples_per_s
            return LocalResult(head, len(y), rep.loss, rep.seconds, rep.steps)

    def _train(self, start: Mapping[str, np.ndarray], tcfg: TrainConfig, x: np.ndarray, y: np.ndarray, steps: int,
               budget_s: float):
        args = (dict(start), tcfg, x, y, steps, budget_s, self.cfg.cpu_fraction)
        if self.cfg.isolate == "thread":
            return _train_candidate(*args)
        import os
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
    def save_checkpoint(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        from protocol.bundle import save_head_atomic

        save_head_atomic(d / "head.npz", self.head)
        meta = {"bundle_id": self.bundle_id, "head_version": self.head_version, "samples_seen": self.samples_seen,
                "labelled": self.labelled, "saved": time.time()}
        tmp = d / ".meta.json.tmp"
        with open(tmp, "w") as fh:
            json.dump(meta, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, d / "meta.json")

    def load_checkpoint(self) -> str | None:
        """Restore a saved head trained on this bundle; returns why not, or None when restored."""
        from protocol.bundle import load_head

        try:
            meta = json.loads((self.dir / "meta.json").read_text())
        except (OSError, ValueError):
            return "no checkpoint"
        if meta.get("bundle_id") != self.bundle_id:
            return "checkpoint belongs to another bundle"
        try:
            head = load_head(self.dir / "head.npz")
        except ValueError as exc:
            return f"checkpoint head unreadable: {exc}"
        if {k: v.shape for k, v in head.items()} != self.shapes:
            return "checkpoint head shape does not match the bundle"
        self.head = head
        self.head_version = int(meta.get("head_version", 0))
        self.samples_seen = int(meta.get("samples_seen", 0))
        self.labelled = int(meta.get("labelled", 0))
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
