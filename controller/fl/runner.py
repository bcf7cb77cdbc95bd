"""The round runner: the I/O side of federated rounds, inside ``fleetctl serve``.

It owns concurrency, deadlines and the broker; the engine (``engine.py``) decides and
the strategy (``strategies.py``) computes. Every half second it advances each running
run against the registry's live view of the fleet, sends the tasks the engine asks
for (signed frames), and feeds arriving updates back to the engine, answering each
device with ``fl.ack``. All state is in SQLite, so a restarted service resumes.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from protocol import fl as fl_msgs  # noqa: F401 - registers the fl.* kinds
from protocol import secagg_wire  # noqa: F401 - registers fl.secagg
from protocol.binary import Frame, decode_frame
from protocol.envelope import DecodeError
from protocol.mqttlink import Message

from .store import RoundStore
from .engine import RoundEngine, RunConfig
from ..failpoints import failpoint  # noqa: F401 - tests and the engine call it by this name
from .selection import ClientInfo

if TYPE_CHECKING:  # pragma: no cover
    from ..channel import ControlChannel
    from ..config import ControllerConfig
    from ..lease import Leases
    from ..registry import Registry
    from ..rollouts.store import RolloutStore
    from .secure import SecureRound
    from .strategies import Strategy

log = logging.getLogger("fleetctl.rounds")

#: every step boundary of a round where a test may kill the controller (EDGEFLEET_FAILPOINT=name):
#: each step must be idempotent across a restart at any of them
FAILPOINTS = (
    "fl.round.opened",      # a round and its selection are stored; no task published yet
    "fl.task.published",    # a task handed to paho; the broker has not acknowledged it
    "fl.task.acked",        # the broker acknowledged a task; the store does not say "sent" yet
    "fl.task.marked",       # the store says "sent"
    "fl.update.received",   # an update taken off the wire (paho already acknowledged it); not recorded
    "fl.update.recorded",   # an update and its verdict recorded; no fl.ack published
    "fl.ack.published",     # the fl.ack handed to paho; not acknowledged
    "fl.ack.acked",         # the broker acknowledged the fl.ack; the store does not say so yet
    "fl.round.closed",      # a round closed (aggregated or failed); the new head not published
)



#: a task or ack in flight longer than this (its PUBACK never came) is published again
RESEND_AFTER_S = 30.0
#: how often done runs are looked at for a deploy that a crash or a dead replica left undone
DEPLOY_CHECK_S = 5.0


def strategy_for(cfg: RunConfig) -> "Strategy":
    """The run's strategy (by name, from ``controller.fl.strategies``); with ``dp`` set, wrapped in
    ``DPFixedClipping`` (clip → the strategy aggregates → noise from OS entropy)."""
    from . import strategies
    from .privacy import DPConfig, DPFixedClipping

    strategy = strategies.make(cfg.strategy, **dict(cfg.strategy_params))
    mu = strategy.task_config.get("prox_mu")
    if cfg.prox_mu and mu is not None and mu != cfg.prox_mu:
        raise ValueError(f"--prox-mu {cfg.prox_mu:g} conflicts with {cfg.strategy}'s mu {mu:g}: "
                         f"give it once, as --strategy-param mu={cfg.prox_mu:g}")
    dp = DPConfig.from_dict(cfg.dp)
    return strategy if dp is None else DPFixedClipping(strategy, dp)


def evaluator_for(cfg: RunConfig):
    """Accuracy of a head on the run's held-out features (computed once at ``round start``). A run
    over chosen layers carries only those: the eval file holds the bundle's whole head
    (``head__<tensor>``), and the run's layers are put on its frozen ones before the forward pass."""
    if not cfg.eval_file:
        return None
    prefix = "head__"
    try:
        with np.load(cfg.eval_file, allow_pickle=False) as z:
            feats, labels = z["features"].astype(np.float32), z["y"].astype(np.int64)
            full = {k[len(prefix):]: z[k].astype(np.float32) for k in z.files if k.startswith(prefix)}
    except (OSError, KeyError, ValueError) as exc:
        log.warning("run evaluation disabled: %s", exc)
        return None
    from protocol.bundle import head_forward
    from protocol.layers import merge

    def evaluate(head) -> float:
        whole = merge(full, head) if full and set(head) != set(full) else head
        return float((head_forward(whole, feats).argmax(1) == labels).mean())
    return evaluate


def decompress_update(frame: Frame, global_head: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The device's delta as float tensors (raw tensors, or a compressed blob)."""
    if frame.envelope.body["encoding"] == "raw":
        return {k: np.asarray(v, dtype=np.float32) for k, v in frame.tensors.items()}
    from protocol.compression import decode_update

    return decode_update(frame.blob, {k: v.shape for k, v in global_head.items()})


class RoundRunner:
    def __init__(self, channel: "ControlChannel", registry: "Registry", store: RoundStore, rollouts: "RolloutStore",
                 cfg: "ControllerConfig", reject: Callable[[str, str, str], None], tick_s: float = 0.5,
                 clock: Callable[[], float] = time.time, leases: "Leases | None" = None) -> None:
        self.channel, self.registry, self.rollouts, self.cfg, self.reject = channel, registry, rollouts, cfg, reject
        self.clock = clock
        self.store = store
        self.engines: dict[str, RoundEngine] = {}
        self.tick_s = tick_s
        self.counts: dict[str, int] = {"tasks_sent": 0, "updates": 0, "rejected_updates": 0, "not_owner": 0,
                                       "running": 0, "site_updates": 0}
        #: each run has one owner among the replicas (controller/lease.py); None: we are the only one
        self.leases = leases
        self._epochs: dict[str, int] = {}
        #: (run, round, device) of a task or ack published and not acknowledged yet -> when published
        self._in_flight: dict[tuple[str, str, int, str], float] = {}
        self._link_up_since: float | None = None
        self._acks_checked = False
        #: (run, round) -> its secure-aggregation session (secure.py); in memory only
        self.secure: dict[tuple[str, int], "SecureRound"] = {}
        self._deploys_checked = -math.inf

    def engine(self, run_id: str) -> RoundEngine:
        eng = self.engines.get(run_id)
        if eng is None:
            run = self.store.run(run_id)
            cfg = RunConfig.from_dict(run.config)
            eng = RoundEngine(run_id, self.store, strategy_for(cfg), evaluator_for(cfg))
            self.engines[run_id] = eng
        return eng

    def owns(self, run_id: str, now: float, renew: bool = True) -> bool:
        """Whether this replica is the run's owner now (taking the lease when it is free or expired).
        A lease taken anew (first tick, or over from a dead replica) drops what we cached of the run:
        the store is the truth, and the acks the last owner never saw acknowledged are sent again.
        ``renew=False`` (message handlers): only what the last tick took, no database write."""
        if self.leases is None:
            return True
        name = f"fl:{run_id}"
        epoch = self.leases.hold(name, now) if renew else self.leases.cached(name, now)
        if not renew and epoch is None:
            return False
        if epoch is None:
            if self._epochs.pop(run_id, None) is not None:
                self._forget(run_id)
            return False
        if self._epochs.get(run_id) != epoch:
            self._forget(run_id)
            self._epochs[run_id] = epoch
            self._acks_checked = False
        return True

    def _forget(self, run_id: str) -> None:
        self.engines.pop(run_id, None)
        for key in [k for k in self._in_flight if k[1] == run_id]:
            del self._in_flight[key]

    def clients(self, now: float) -> list[ClientInfo]:
        return [ClientInfo.from_registry(d, now) for d in self.registry.devices()]

    async def run(self) -> None:
        while True:
            try:
                self.tick(self.clock())
            except Exception:  # noqa: BLE001 - a bad run must not stop ingestion
                log.exception("round runner tick failed")
            await asyncio.sleep(self.tick_s)

    def _link_state(self, now: float) -> float | None:
        """When our broker link came up (None while it is down): the engine decides nothing blind."""
        if not self.channel.connected():
            self._link_up_since = None
            self._acks_checked = False
        elif self._link_up_since is None:
            self._link_up_since = now
        return self._link_up_since

    def tick(self, now: float) -> None:
        self.registry.commit()
        link_up_since = self._link_state(now)
        runs = self.store.runs(status=("pending", "running"))
        self.counts["running"] = len(runs)
        runs = [r for r in runs if self.owns(r.id, now)]
        if link_up_since is not None and not self._acks_checked:
            self._acks_checked = True
            self._resend_acks(tuple(r.id for r in runs))
        for run in runs:
            try:
                eng = self.engine(run.id)
            except Exception as exc:  # noqa: BLE001 - e.g. unknown strategy: fail the run, loudly
                log.error("run %s cannot start: %s", run.id, exc)
                self.store.update_run(run.id, status="failed", error=str(exc))
                continue
            before = run.round_no
            if run.config.get("secagg"):
                self._drive_secure(eng, now, link_up_since is not None)
            tasks, outcomes = eng.step(now, self.clients(now), link_up_since)
            for o in outcomes:
                failpoint("fl.round.closed")
                self._announce(run.id, o)
            out = eng.maybe_aggregate_async(now)
            if out:
                failpoint("fl.round.closed")
                self._announce(run.id, out)
            if run.config.get("deploy") and (after := self.store.run(run.id)) and after.status == "done":
                self.deploy_result(after)
            if tasks and tasks[0].round_no != before:
                failpoint("fl.round.opened")
            for t in tasks:
                self._send_task(eng, t, now)
        if now - self._deploys_checked >= DEPLOY_CHECK_S:
            self._deploys_checked = now
            self._finish_deploys(now)

    def _finish_deploys(self, now: float) -> None:
        """A run that ended ``done`` with ``--deploy`` and no rollout yet: its owner died (or the
        controller was killed) between closing the last round and deploying. The run is no longer
        pending or running, so the loop above never sees it: deploy it here, under its lease."""
        for run in self.store.runs(status=("done",), limit=20):
            dep = run.config.get("deploy")
            if not dep or dep.get("rollout_id") or dep.get("error") or not self.owns(run.id, now):
                continue
            log.info("run %s: done but not deployed (its owner stopped in between): deploying now", run.id)
            self.deploy_result(run)

    def _drive_secure(self, eng: RoundEngine, now: float, connected: bool) -> None:
        """Open the running round's session, close its due stage (sending the next stage's messages),
        and hand its result to the engine."""
        from .secure import SecAggConfig, SecureRound

        run = eng.run
        cur = self.store.round(run.id, run.round_no) if run.round_no else None
        if cur is None or cur.status != "running":
            return
        key = (run.id, cur.round_no)
        sess = self.secure.get(key)
        if sess is None:
            sess = SecureRound(run.id, cur.round_no, tuple(cur.selected), {k: v.shape for k, v in run.head.items()},
                               SecAggConfig.from_dict(run.config["secagg"]), cur.deadline)
            self.secure[key] = sess
            eng.hold.add(cur.round_no)
        if not connected:
            return
        for device_id, body in sess.poll(now):
            if self.channel.send(device_id, "fl.secagg", body):
                from protocol.secagg_wire import size_of_body

                sess.bytes_out += size_of_body(body)
        if sess.ready(now):
            del self.secure[key]
            try:
                mean, n, meta = sess.result()
            except Exception as exc:  # noqa: BLE001 - SecAggError: the session could not finish
                log.warning("round %s/%d: secure aggregation failed: %s", run.id, cur.round_no, exc)
                eng.on_secure_result(now, cur.round_no, None, 0, {}, error=str(exc))
                return
            log.info("round %s/%d: securely aggregated %d updates (%d dropped)", run.id, cur.round_no,
                     meta["secagg_clients"], len(meta["secagg_dropped"]))
            eng.on_secure_result(now, cur.round_no, mean, n, meta)

    def on_secagg_message(self, device_id: str, frame: Frame, size: int, topic: str) -> None:
        b = frame.envelope.body
        sess = next((s for s in self.secure.values() if s.session == b.get("session")), None)
        why = "no secure session " + repr(b.get("session")) if sess is None else sess.on_message(
            device_id, b, frame.tensors, size)
        if why is not None:
            self.reject("secagg_refused", topic, why)
            log.warning("secure aggregation message from %s refused: %s", device_id, why)
            self.channel.send(device_id, "fl.secagg", {"stage": "refused", "session": str(b.get("session")),
                                                       "reason": why})
            return
        self.tick(time.time())   # the stage may be complete now

    def _send_task(self, eng: RoundEngine, task, now: float) -> None:
        """Publish a task; the store says "sent" only when the broker acknowledged it (its PUBACK)."""
        key = ("task", eng.run_id, task.round_no, task.device_id)
        if not self.channel.connected() or now - self._in_flight.get(key, -math.inf) < RESEND_AFTER_S:
            return
        self._in_flight[key] = now
        fut = self.channel.send_frame_acked(task.device_id, "fl.task", task.body, tensors=task.head)
        failpoint("fl.task.published")

        def done(f) -> None:
            if self._in_flight.get(key) == now:
                del self._in_flight[key]
            if f.cancelled() or not f.result():
                log.info("round %s/%d: task to %s not acknowledged; it will be sent again", eng.run_id,
                         task.round_no, task.device_id)
                return
            failpoint("fl.task.acked")
            eng.task_sent(task)
            failpoint("fl.task.marked")
            self.counts["tasks_sent"] += 1
            log.info("round %s/%d: task to %s (%d steps)", eng.run_id, task.round_no, task.device_id,
                     task.body["steps"])
        fut.add_done_callback(done)

    def _announce(self, run_id: str, outcome) -> None:
        lvl = logging.INFO if outcome.status == "aggregated" else logging.WARNING
        log.log(lvl, "run %s round %d %s: %s", run_id, outcome.round_no, outcome.status, outcome.metrics)
        if outcome.status == "aggregated" and outcome.new_version is not None:
            self.publish_head(run_id, outcome.new_version)

    def deploy_result(self, run) -> str | None:
        """A finished run's global head becomes a new bundle version, rolled out canary first to the
        devices that run the run's base bundle — the same signed, health-gated path as any model."""
        from pathlib import Path

        from protocol.patch import PatchError

        from ..rollouts.policy import RolloutPolicy, plan_waves

        dep = dict(run.config["deploy"])
        rollouts = self.rollouts
        try:
            from ..modeltools.example import derive_bundle

            base = rollouts.add_bundle(dep["bundle"])
            version = f"{base.version}+fl.{run.id[-4:]}.{run.global_version}"
            out = Path(rollouts.artifacts_dir) / "derived" / f"{run.id}-v{run.global_version}"
            from protocol.bundle import load_bundle
            from protocol.layers import merge

            full = load_bundle(base.path).head or {}
            derive_bundle(base.path, out, version, merge(full, run.head),   # the run carries the trainable layers
                          lineage=self.lineage_of(run))
            art = rollouts.add_bundle(out)
        except (ImportError, OSError, PatchError, ValueError, KeyError, StopIteration) as exc:  # LayerError too
            log.error("run %s: cannot make a bundle from its head: %s", run.id, exc)
            self.store.set_config(run.id, {**run.config, "deploy": {**dep, "error": str(exc)}})   # said once
            return None
        devices = [d for d in self.registry.devices()
                   if ((d.state or {}).get("model") or {}).get("bundle_sha256") == base.bundle_sha256]
        current = {d.id: (base.bundle_sha256, base.version) for d in devices}
        policy = RolloutPolicy(canary=float(dep.get("canary", 0.1)), max_failures=int(dep.get("max_failures", 0)))
        rid = f"fl-{run.id[4:]}"
        if rollouts.rollout(rid) is None and devices:
            rollouts.create_rollout(rid, version, art.bundle_sha256, policy.to_dict(), {"run": run.id},
                                    plan_waves(sorted(d.id for d in devices), policy.canary), current)
            log.info("run %s: head v%d rolled out as %s to %d device(s) (%s)", run.id, run.global_version, version,
                     len(devices), rid)
        run_cfg = dict(run.config)
        run_cfg["deploy"] = {**dep, "rollout_id": rid}
        self.store.set_config(run.id, run_cfg)
        return rid

    def lineage_of(self, run) -> dict:
        """A federated result's lineage: the run, its aggregated rounds, who took part, how, and DP."""
        rounds = [r for r in self.store.rounds(run.id) if r.status == "aggregated"] or self.store.rounds(run.id)
        devices = sorted({u.device_id for r in rounds for u in self.store.updates(run.id, r.round_no)
                          if u.accepted and not u.meta.get("site_update")})   # a site's boards, not its relay
        last = next((r.metrics for r in reversed(rounds) if r.metrics and "dp_epsilon" in r.metrics), None)
        return {"kind": "federated", "run_id": run.id, "rounds": [r.round_no for r in rounds], "devices": devices,
                "n_devices": len(devices), "strategy": str(run.config.get("strategy", "?")),
                "dp": {"epsilon": last["dp_epsilon"], "delta": last.get("dp_delta")} if last else None}

    def publish_head(self, run_id: str, version: int) -> int:
        """Send the new global head to every online device of the run that learns (until rollouts ship it)."""
        run = self.store.run(run_id)
        if run is None or not run.head:
            return 0
        group, only = run.config.get("group"), run.config.get("devices")
        sent = 0
        for d in self.registry.devices():
            if not d.online or (group and d.group != group) or (only is not None and d.id not in only) \
                    or "learning" not in (d.telemetry or {}):
                continue
            if self.channel.send_frame(d.id, "fl.head", {"run_id": run_id, "version": version}, tensors=run.head):
                sent += 1
        return sent

    def on_update_message(self, device_id: str, msg: Message) -> None:
        """An ``fl.update`` frame from ``device_id`` (topic already parsed)."""
        try:
            frame = decode_frame(msg.payload, max_bytes=self.cfg.mqtt.max_frame_bytes, expect_sender=device_id)
        except DecodeError as exc:
            self.reject(exc.reason, msg.topic, str(exc))
            return
        env = frame.envelope
        if env.kind == "fl.secagg":
            self.on_secagg_message(device_id, frame, len(msg.payload), msg.topic)
            return
        if env.kind == "fl.site_update":
            self.on_site_update(device_id, frame, len(msg.payload))
            return
        if env.kind != "fl.update":
            self.reject("kind_topic_mismatch", msg.topic, f"kind {env.kind!r} on an update topic")
            return
        b = env.body
        run = self.store.run(b["run_id"])
        if run is None:
            self._ack(device_id, b, False, f"unknown run {b['run_id']!r}")
            return
        if not self.owns(run.id, time.time(), renew=False):
            self.counts["not_owner"] += 1   # the owner got it too; the device sends it again until fl.ack
            return
        if run.status == "stopped":
            self._ack(device_id, b, False, f"run {run.id} was stopped: {run.error or 'by the operator'}")
            return
        try:
            delta = decompress_update(frame, self.engine(run.id).strategy.expected_update(run.head or {}))
        except (ValueError, KeyError) as exc:
            self._ack(device_id, b, False, f"cannot decode update: {exc}")
            return
        meta = {k: b[k] for k in ("train_loss", "train_time_s", "samples_per_s", "steps") if k in b}
        meta["bytes"] = len(msg.payload)
        failpoint("fl.update.received")
        verdict = self.engine(run.id).on_update(time.time(), device_id, b["round"], b["base_version"],
                                                b["num_samples"], delta, meta, sent_ts=env.ts)
        failpoint("fl.update.recorded")
        self.counts["updates"] += 1
        if verdict.duplicate:
            log.info("update from %s for %s/%d again (our ack was lost?): answering %s", device_id, run.id,
                     b["round"], "accepted" if verdict.accepted else f"rejected: {verdict.reason}")
        elif not verdict.accepted:
            self.counts["rejected_updates"] += 1
            log.warning("update from %s for %s/%d rejected: %s", device_id, run.id, b["round"], verdict.reason)
        self._ack(device_id, b, verdict.accepted, verdict.reason)
        self.tick(time.time())  # close the round now if this was the last update

    def site_members(self, relay_id: str, boards) -> dict[str, str | None]:
        """The registry's sites of a relay (only if its state says ``role = relay``) and of boards."""
        def site_of(dev_id: str, relay: bool = False) -> str | None:
            d = self.registry.device(dev_id)
            if d is None or (relay and (d.state or {}).get("role") != "relay"):
                return None
            return d.site
        return {relay_id: site_of(relay_id, True), **{b: site_of(b) for b in boards}}

    def on_site_update(self, relay_id: str, frame: Frame, size: int) -> None:
        """A site relay's one update for its boards (``protocol.sitefl``): the relay gets the verdict
        (with ``exclude``: the boards to leave out and send again); each board it counted gets its own
        ``fl.ack`` from us, so a board's promise ("sent" = acknowledged by the controller) holds."""
        b = frame.envelope.body
        run = self.store.run(b["run_id"])
        if run is None:
            self._ack(relay_id, b, False, f"unknown run {b['run_id']!r}")
            return
        if not self.owns(run.id, time.time(), renew=False):
            self.counts["not_owner"] += 1
            return
        eng = self.engine(run.id)
        mean = {k: np.asarray(v, np.float32) for k, v in frame.tensors.items()} if frame.tensors else None
        meta = {"bytes": size, **({"train_loss": b["train_loss"]} if "train_loss" in b else {})}
        failpoint("fl.update.received")
        verdict = eng.on_site_update(time.time(), relay_id, b["round"], b["base_version"], b["site"],
                                     b["weighting"], b["contributors"], mean, meta,
                                     sent_ts=frame.envelope.ts, members=self.site_members(relay_id, b["contributors"]))
        failpoint("fl.update.recorded")
        self.counts["site_updates"] += 1
        if not verdict.accepted:
            self.counts["rejected_updates"] += 1
            log.warning("site update from %s (%s) for %s/%d refused: %s", relay_id, b["site"], run.id, b["round"],
                        verdict.reason)
        else:
            log.info("site update from %s (%s) for %s/%d: %d boards, %d samples", relay_id, b["site"], run.id,
                     b["round"], len(verdict.boards), b["num_samples"])
        self._ack(relay_id, b, verdict.accepted, verdict.reason, exclude=verdict.exclude)
        if verdict.accepted:
            for board in verdict.boards:
                self._ack(board, b, True, f"accepted via site {b['site']}")
        self.tick(time.time())

    def _ack(self, device_id: str, body: dict, accepted: bool, reason: str, exclude: tuple[str, ...] = ()) -> None:
        """``fl.ack``; once the broker acknowledged it the store says so, so a restarted controller
        sends again only the acks a crash lost."""
        run_id, round_no = str(body.get("run_id")), int(body.get("round", 0))
        ack = {"run_id": run_id, "round": round_no, "accepted": accepted, "reason": reason}
        if exclude:
            ack["exclude"] = list(exclude)
        fut = self.channel.send_acked(device_id, "fl.ack", ack)
        failpoint("fl.ack.published")
        store = self.store

        def done(f) -> None:
            if f.cancelled() or not f.result():
                self._acks_checked = False   # try again at the next tick with the link up
                return
            failpoint("fl.ack.acked")
            store.mark_acked(run_id, round_no, device_id)
        fut.add_done_callback(done)

    def _resend_acks(self, run_ids: tuple[str, ...]) -> None:
        """The acks of recorded updates the broker never acknowledged (we crashed, or the link dropped)."""
        for run_id, device_id, accepted, reason, task_round in self.store.unacked(run_ids):
            log.info("fl.ack for %s/%d to %s again (never acknowledged)", run_id, task_round, device_id)
            self._ack(device_id, {"run_id": run_id, "round": task_round}, accepted, reason or "accepted")
