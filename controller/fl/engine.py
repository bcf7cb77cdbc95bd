"""The federated round engine: decides, never does I/O (the runner acts).

Inputs: a snapshot of clients (from the registry), updates as they arrive, and the
time. Outputs: tasks to send and round outcomes. The run's strategy decides what each
task carries (``configure``: the engine sends exactly that, plus the sized steps) and
what the round's results *and failures* make (``aggregate``). All state lives in ``RoundStore``,
so a new engine built over the same store after a controller crash resumes the run:
updates already received are kept and a task is never sent twice to the same device
for the same round.

Sync mode: select → tasks → aggregate what arrived by the deadline if the quorum is
met (late updates are refused), else the round fails and no new head is published.
Async mode (FedBuff): every eligible client works continuously from the version it
was given; each ``buffer`` accepted updates make a new version, weighted by
staleness; an update staler than ``max_staleness`` versions is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
import math
import random
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .secure import SECAGG_ID
from .store import RoundStore, UpdateRow
from .selection import why_waiting, ClientInfo, Selection, SelectionPolicy, select
from .strategies import FitFailure, FitResult, Strategy, UpdateRejected, validate_update

Head = dict[str, np.ndarray]


#: a run in one of these states is over
TERMINAL = ("done", "partial", "failed", "cancelled", "stopped")   # stopped: ``fleetctl round stop``
#: after the controller's link came back, how long the broker may take to hand over what it queued
SETTLE_S = 2.0


class RunConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RunConfig:
    strategy: str = "fedavg"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    rounds: int = 3
    mode: str = "sync"
    clients: int = 10
    min_clients: int = 1
    deadline_s: float = 60.0
    local_steps: int = 20
    lr: float = 0.05
    batch_size: int = 32
    optimizer: str = "sgd"
    prox_mu: float = 0.0
    min_samples: int = 8
    max_update_norm: float = 1e4
    compression: Mapping[str, Any] = field(default_factory=dict)
    dp: Mapping[str, Any] | None = None
    buffer: int = 2
    max_staleness: int = 4
    group: str | None = None
    devices: tuple[str, ...] | None = None   # only these device ids (round start --to/--tag), None: any
    seed: int = 0
    start_timeout_s: float = 120.0
    eval_file: str | None = None      # npz of backbone features + labels: accuracy of each new head
    max_cpu_percent: float = 90.0     # devices busier than this are not selected
    deploy: Mapping[str, Any] | None = None   # {"bundle": dir, "canary": f, "max_failures": n}: roll the
                                              # final global head out as a new bundle version (rollouts)
    secagg: Mapping[str, Any] | None = None   # {"max_dropout": f, "stage_s": s}: secure aggregation (secure.py)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise RunConfigError(msg)
        need(self.mode in ("sync", "async"), f"mode must be sync or async, got {self.mode!r}")
        need(1 <= self.rounds <= 10000, "rounds must be 1..10000")
        need(1 <= self.min_clients <= self.clients, "need 1 <= min_clients <= clients")
        need(0 < self.deadline_s <= 86400, "deadline must be 0..86400 s")
        need(1 <= self.local_steps <= 100000, "local_steps must be 1..100000")
        need(0 < self.lr < 10, "lr must be in (0, 10)")
        need(self.prox_mu >= 0, "prox_mu must be >= 0")
        need(self.max_update_norm > 0, "max_update_norm must be > 0")
        need(1 <= self.buffer <= self.clients, "async buffer must be 1..clients")
        need(self.max_staleness >= 0, "max_staleness must be >= 0")
        try:
            from .secure import SecAggConfig, check_composes

            check_composes(self.strategy, self.compression, SecAggConfig.from_dict(self.secagg))
        except ValueError as exc:
            raise RunConfigError(str(exc)) from None
        need(self.secagg is None or self.mode == "sync", "secure aggregation needs sync rounds")
        need(self.deploy is None or (isinstance(self.deploy, Mapping) and isinstance(self.deploy.get("bundle"), str)),
             "deploy needs the bundle directory the run's head belongs to")

    def to_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise RunConfigError(f"unknown run config keys: {', '.join(sorted(unknown))}")
        return cls(**d)

    def policy(self) -> SelectionPolicy:
        return SelectionPolicy(clients=self.clients, min_samples=self.min_samples, group=self.group,
                               devices=tuple(self.devices) if self.devices is not None else None,
                               max_cpu_percent=self.max_cpu_percent,
                               deadline_s=self.deadline_s, local_steps=self.local_steps, batch_size=self.batch_size)


@dataclass(frozen=True)
class Task:
    device_id: str
    round_no: int
    body: dict[str, Any]
    head: Head


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    duplicate: bool = False         # the answer recorded for an update already received
    exclude: tuple[str, ...] = ()   # a site update: boards already counted (send again without them)
    boards: tuple[str, ...] = ()    # a site update accepted: the boards it counted


def is_site_row(u: UpdateRow) -> bool:
    """The row of a site's aggregate (its tensors; its boards have rows of their own, ``via_site``)."""
    return bool(u.meta.get("site_update"))


@dataclass(frozen=True)
class RoundOutcome:
    round_no: int
    status: str                     # "aggregated" | "failed"
    metrics: dict[str, Any]
    new_version: int | None = None


class RoundEngine:
    def __init__(self, run_id: str, store: RoundStore, strategy: Strategy,
                 evaluate: "Callable[[Head], float] | None" = None) -> None:
        run = store.run(run_id)
        if run is None:
            raise KeyError(f"unknown run {run_id}")
        self.run_id = run_id
        self.store = store
        self.cfg = RunConfig.from_dict(run.config)
        self.strategy = strategy
        self.evaluate = evaluate
        self.rng = random.Random(self.cfg.seed + run.round_no)
        self.started_waiting: float | None = None
        #: rounds whose secure-aggregation session is still running: not closed on their deadline
        self.hold: set[int] = set()

    # -- helpers -----------------------------------------------------------
    @property
    def run(self):  # fresh from the store: the store is the truth
        return self.store.run(self.run_id)

    def _tasks(self, round_no: int, devices: Sequence[str], steps: Mapping[str, int], version: int,
               deadline: float, head: Head) -> list[Task]:
        """What the strategy configures for each device (Flower's configure_fit), with its sized steps."""
        if not devices:
            return []
        c = self.cfg
        base: dict[str, Any] = {"run_id": self.run_id, "base_version": version, "lr": c.lr,
                                "batch_size": c.batch_size, "optimizer": c.optimizer, "prox_mu": c.prox_mu,
                                "deadline_ts": deadline, "compression": dict(c.compression)}
        if c.secagg:
            base["secagg"] = {"session": f"{self.run_id}#{round_no}"}
        elif c.mode == "sync" and self.strategy.site_weighting:
            base["site_agg"] = self.strategy.site_weighting   # a site relay may pre-aggregate (sitefl)
        cfgs = self.strategy.configure(round_no, list(devices), base)
        if head:   # the strategy's stored state (SCAFFOLD's control variate) goes out with the head
            self.strategy.load_state(self.run.strategy_state or {})
        tensors = self.strategy.task_tensors(head) if head else head
        return [Task(d, round_no, {**cfgs[d], "round": round_no, "steps": steps.get(d, c.local_steps)}, tensors)
                for d in devices]

    def _note_sizing(self, round_no: int, sel: Selection) -> None:
        """The round history says which devices got fewer steps than asked, and why."""
        if sel.lowered:
            self.store.note_round(self.run_id, round_no, {"steps_lowered": {
                d: {"asked": self.cfg.local_steps, "sent": sel.steps[d], "why": why} for d, why in sel.lowered.items()}})

    # -- decide ------------------------------------------------------------
    def step(self, now: float, clients: Sequence[ClientInfo], link_up_since: float | None = -math.inf
             ) -> tuple[list[Task], list[RoundOutcome]]:
        """Advance the run: start rounds, (re)issue unsent tasks, close rounds that are due.

        ``link_up_since``: when the controller's own broker link came up (None: it is down). While
        the controller cannot hear the fleet, and for ``SETTLE_S`` after it reconnected (the broker
        hands over what it queued for us), no round is closed on its deadline."""
        run = self.run
        if run is None or run.status in TERMINAL:
            return [], []
        if run.status == "pending":
            self.store.update_run(self.run_id, status="running")
        if self.cfg.mode == "async":
            return self._step_async(now, clients)
        return self._step_sync(now, clients, link_up_since)

    def _hearing(self, now: float, link_up_since: float | None) -> bool:
        return link_up_since is not None and now - link_up_since >= SETTLE_S

    def _step_sync(self, now: float, clients: Sequence[ClientInfo], link_up_since: float | None = -math.inf
                   ) -> tuple[list[Task], list[RoundOutcome]]:
        run = self.run
        outcomes: list[RoundOutcome] = []
        cur = self.store.round(self.run_id, run.round_no) if run.round_no else None
        if cur is not None and cur.status == "running":
            # Only answers close a round early; looking offline (a last will, a broker restart, the
            # controller's own outage) never does: the deadline is the deadline.
            answered = {u.device_id for u in self.store.updates(self.run_id, cur.round_no)}
            waiting = [] if SECAGG_ID in answered else [d for d in cur.selected if d not in answered]
            if cur.round_no in self.hold and waiting:
                return self._unsent(cur, run.global_version), outcomes
            if not waiting or (now >= cur.deadline and self._hearing(now, link_up_since)):
                online = {c.device_id for c in clients if c.online}
                outcomes.append(self._close_sync(cur, now, early=not waiting,
                                                 gone=[d for d in waiting if d not in online]))
                run = self.run
            else:
                return self._unsent(cur, run.global_version), outcomes
        if run.status != "running":
            return [], outcomes
        if run.round_no >= self.cfg.rounds:
            self._finish_run()
            return [], outcomes
        sel = select(clients, self.cfg.policy(), self.rng)
        if len(sel.selected) < self.cfg.min_clients:
            if self.started_waiting is None:
                self.started_waiting = now
            why = why_waiting(sel, self.cfg.min_clients)
            if now - self.started_waiting > self.cfg.start_timeout_s:
                self.store.update_run(self.run_id, status="failed", waiting=None,
                                      error=f"no round could start in {self.cfg.start_timeout_s:g}s: {why}")
            elif why != run.waiting:
                self.store.update_run(self.run_id, waiting=why)   # `round start --wait` shows it
            return [], outcomes
        self.started_waiting = None
        if run.waiting is not None:
            self.store.update_run(self.run_id, waiting=None)
        round_no = run.round_no + 1
        deadline = now + self.cfg.deadline_s
        self.store.start_round(self.run_id, round_no, now, deadline, sel.selected, sel.steps)
        self._note_sizing(round_no, sel)
        return self._unsent(self.store.round(self.run_id, round_no), run.global_version), outcomes

    def _finish_run(self) -> None:
        """``done`` only when the run reached its rounds: else ``partial`` (some aggregated) or ``failed``."""
        run = self.run
        made = sum(1 for r in self.store.rounds(self.run_id) if r.status == "aggregated")
        if made >= self.cfg.rounds:
            self.store.update_run(self.run_id, status="done")
        elif made == 0:
            self.store.update_run(self.run_id, status="failed",
                                  error=f"no round aggregated ({self.cfg.rounds} asked; global version "
                                        f"{run.global_version})")
        else:
            self.store.update_run(self.run_id, status="partial", error=f"{made} of {self.cfg.rounds} rounds aggregated")

    def _unsent(self, cur, version: int) -> list[Task]:
        return self._tasks(cur.round_no, [d for d in cur.selected if d not in cur.tasks_sent], cur.steps, version,
                           cur.deadline, self.run.head or {})

    def task_sent(self, task: Task) -> None:
        """Call only once the broker acknowledged the task (its PUBACK), never when it was merely queued."""
        self.store.mark_task_sent(self.run_id, task.round_no, task.device_id)

    def _close_sync(self, cur, now: float, early: bool, gone: list[str]) -> RoundOutcome:
        all_ups = self.store.updates(self.run_id, cur.round_no)
        ups = [u for u in all_ups if u.accepted]
        boards = [u for u in ups if not is_site_row(u)]        # direct updates and boards counted via a site
        carriers = [u for u in ups if u.update is not None]    # what holds tensors: direct updates and sites
        metrics: dict[str, Any] = {"selected": len(cur.selected), "received": len(boards), "dropped": gone,
                                   "duration_s": round(now - cur.started, 3),
                                   "closed": "all selected devices answered" if early else "deadline"}
        metrics.update(_update_metrics([u for u in ups if not u.meta.get("via_site")]))
        sites = _site_metrics(ups)
        if sites:
            metrics["sites"] = sites
        n_ok = sum(int(u.meta.get("secagg_clients", 1)) for u in boards)
        for u in ups:
            metrics.update({k: v for k, v in u.meta.items() if k.startswith("secagg_")})
        if n_ok < self.cfg.min_clients:
            when = ("every selected device answered before the deadline" if early else "by the deadline")
            metrics["reason"] = (f"quorum not met: {n_ok} of {self.cfg.min_clients} accepted updates"
                                 + ("; " if early else " ") + when)
            self.store.finish_round(self.run_id, cur.round_no, "failed", metrics)
            return RoundOutcome(cur.round_no, "failed", metrics)
        got = {u.device_id for u in all_ups}
        if SECAGG_ID in got:   # one securely aggregated update stands for every survivor
            got |= set(cur.selected) - set(ups[0].meta.get("secagg_dropped", ())) if ups else set()
        failures = [FitFailure(u.device_id, u.reason or "rejected") for u in all_ups if not u.accepted]
        failures += [FitFailure(d, "no update by the deadline" + (" (offline at the deadline)" if d in gone else ""))
                     for d in cur.selected if d not in got]
        results = [FitResult(u.update, u.num_samples, 0, u.device_id,
                             dict(u.meta["contributors"]) if is_site_row(u) else None) for u in carriers]
        return self._apply(cur.round_no, results, failures, metrics)

    def _apply(self, round_no: int, results: list[FitResult], failures: list[FitFailure],
               metrics: dict[str, Any]) -> RoundOutcome:
        """Hand the round's results and failures to the strategy (over its stored state)."""
        run = self.run
        if failures:
            metrics["failures"] = [{"device": f.client_id, "reason": f.reason} for f in failures]
        self.strategy.load_state(run.strategy_state or {})
        new_head = self.strategy.aggregate(run.head or {}, results, failures)
        if new_head is None:
            metrics["reason"] = "strategy produced no new model"
            if failures and not self.strategy.accept_failures:
                metrics["reason"] += f": {len(failures)} failure(s) and the strategy does not accept failures"
            self.store.finish_round(self.run_id, round_no, "failed", metrics)
            return RoundOutcome(round_no, "failed", metrics)
        state = self.strategy.to_state()
        version = run.global_version + 1
        metrics["version"] = version
        if self.evaluate is not None:
            try:
                metrics["accuracy"] = round(float(self.evaluate(new_head)), 5)
            except Exception as exc:  # noqa: BLE001 - evaluation is informative, never fatal
                metrics["accuracy_error"] = str(exc)
        if "dp_epsilon" in state:
            metrics["dp_epsilon"], metrics["dp_delta"] = state["dp_epsilon"], state.get("dp_delta")
        # one transaction: a crash never leaves a new version with its round still open (aggregated twice)
        if not self.store.aggregate_round(self.run_id, round_no, new_head, version, state, metrics):
            return RoundOutcome(round_no, "stopped", {**metrics, "reason": "the run was stopped"})
        return RoundOutcome(round_no, "aggregated", metrics, version)

    # -- updates -----------------------------------------------------------
    def on_secure_result(self, now: float, round_no: int, mean: Head | None, num_samples: float,
                         meta: Mapping[str, Any], error: str | None = None) -> Verdict:
        """A secure session's outcome: the one aggregated update of the round (or why there is none)."""
        self.hold.discard(round_no)
        run = self.run
        cur = self.store.round(self.run_id, round_no)
        if run is None or cur is None or cur.status != "running":
            return Verdict(False, "round is not open")
        if mean is None:
            self.store.note_round(self.run_id, round_no, {"secagg_error": error})
            return Verdict(False, error or "secure aggregation failed")
        if not all(np.all(np.isfinite(v)) for v in mean.values()):
            return self._record(round_no, SECAGG_ID, now, False, "secure sum is not finite", 0, run.global_version,
                                dict(meta), None)
        return self._record(round_no, SECAGG_ID, now, True, "accepted", max(1, int(round(num_samples))),
                            run.global_version, dict(meta), mean)

    def on_site_update(self, now: float, relay_id: str, round_no: int, base_version: int, site: str,
                       weighting: str, contributors: Mapping[str, int], mean: Head | None,
                       meta: Mapping[str, Any], sent_ts: float | None = None,
                       members: Mapping[str, str | None] | None = None) -> Verdict:
        """The verdict on a site's aggregate of its boards' updates. Accepted: it is stored with one
        row per board, in one transaction, so each board counts once towards the quorum and a later
        direct update of one of them gets "accepted" as a duplicate. Refused because some boards were
        already counted (direct, or through another site): nothing is stored and ``exclude`` names them,
        so the relay sends again without them. Other refusals are not stored either (the relay then
        forwards each board's own update, and each board gets its own verdict).

        ``members`` (device id -> its site in the registry; the relay's entry is its site only if the
        registry knows it as a relay): a site update counts only from its site's relay, and only for
        boards registered at that site — others are ``exclude``d (the relay forwards their own updates)."""
        run = self.run
        recorded = self.store.update_row(self.run_id, round_no, relay_id)
        if recorded is not None:
            if is_site_row(recorded) and sorted(recorded.meta["contributors"]) == sorted(contributors):
                return Verdict(recorded.accepted, recorded.reason or "accepted", duplicate=True,
                               boards=tuple(sorted(contributors)))
            return Verdict(False, f"{relay_id} already sent an update for round {round_no}")
        if run is None or run.status != "running":
            return Verdict(False, "run is not running")
        if self.cfg.mode != "sync" or self.cfg.secagg:
            return Verdict(False, "site aggregation needs a sync round without secure aggregation")
        want = self.strategy.site_weighting
        if want is None:
            return Verdict(False, f"strategy {self.cfg.strategy} cannot be pre-aggregated at a site: "
                                  f"forward every board's update")
        if weighting != want:
            return Verdict(False, f"site weighting {weighting!r} != {want!r} for {self.cfg.strategy}")
        cur = self.store.round(self.run_id, round_no)
        if cur is None or cur.status != "running":
            return Verdict(False, f"round {round_no} is not open")
        if not (now <= cur.deadline or (sent_ts is not None and sent_ts <= cur.deadline)):
            return Verdict(False, "late: the round's deadline has passed")
        if base_version != run.global_version:
            return Verdict(False, f"base version {base_version} != global {run.global_version}")
        if members is not None and members.get(relay_id) != site:
            return Verdict(False, f"{relay_id} is not registered as the relay of site {site!r}")
        stray = sorted(b for b in contributors if b not in cur.selected)
        if stray:
            return Verdict(False, f"no task in round {round_no} for {', '.join(stray)}", exclude=tuple(stray))
        foreign = sorted(b for b in contributors if members is not None and members.get(b) != site)
        if foreign:
            return Verdict(False, f"not registered at site {site!r}: {', '.join(foreign)}", exclude=tuple(foreign))
        if relay_id in contributors or relay_id in cur.selected:
            return Verdict(False, f"relay {relay_id} cannot also be a contributor of its own site update")
        if mean is None:
            return Verdict(False, "no update tensors")
        try:
            validate_update(mean, self.strategy.expected_update(run.head or {}), max_norm=self.cfg.max_update_norm)
        except UpdateRejected as exc:
            return Verdict(False, exc.reason)
        total = int(sum(contributors.values()))
        site_meta = {**dict(meta), "site_update": True, "site": site, "contributors": dict(contributors)}
        board_rows = [UpdateRow(b, now, True, None, int(n), base_version, {"via_site": site, "via": relay_id}, None)
                      for b, n in sorted(contributors.items())]
        counted = self.store.add_site_update(self.run_id, round_no, UpdateRow(
            relay_id, now, True, None, total, base_version, site_meta, dict(mean)), board_rows)
        if counted:
            return Verdict(False, f"already counted in round {round_no}: {', '.join(counted)}",
                           exclude=tuple(b for b in counted if b != relay_id))
        for b in contributors:   # an answer proves the task arrived
            self.store.mark_task_sent(self.run_id, round_no, b)
        return Verdict(True, "accepted", boards=tuple(sorted(contributors)))

    def on_update(self, now: float, device_id: str, round_no: int, base_version: int, num_samples: int,
                  delta: Head | None, meta: Mapping[str, Any], sent_ts: float | None = None) -> Verdict:
        """The verdict on one update. ``sent_ts``: when the device sent it (its envelope); it matters only
        for an update that reaches us after the deadline of a round still open because we could not
        hear the fleet then. A re-sent update (our ``fl.ack`` was lost) gets the verdict recorded first."""
        run = self.run
        recorded = self.store.update_row(self.run_id, round_no, device_id, task_round=self.cfg.mode == "async")
        if recorded is not None:
            return Verdict(recorded.accepted, recorded.reason or "accepted", duplicate=True)
        if run is None or run.status != "running":
            return Verdict(False, "run is not running")
        if self.cfg.mode == "async":
            return self._on_update_async(now, device_id, round_no, base_version, num_samples, delta, meta)
        cur = self.store.round(self.run_id, round_no)
        if cur is None or device_id not in cur.selected:
            return Verdict(False, f"{device_id} has no task in round {round_no}")
        on_time = now <= cur.deadline or (sent_ts is not None and sent_ts <= cur.deadline)
        if cur.status != "running" or not on_time:
            return self._record(round_no, device_id, now, False, "late: the round's deadline has passed",
                                num_samples, base_version, meta, None)
        if base_version != run.global_version:
            return self._record(round_no, device_id, now, False,
                                f"base version {base_version} != global {run.global_version}",
                                num_samples, base_version, meta, None)
        return self._check_and_record(round_no, device_id, now, num_samples, base_version, delta, meta)

    def _check_and_record(self, round_no, device_id, now, num_samples, base_version, delta, meta) -> Verdict:
        if delta is None:
            return self._record(round_no, device_id, now, False, "no update tensors", num_samples, base_version,
                                meta, None)
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            return self._record(round_no, device_id, now, False, f"num_samples must be > 0, got {num_samples!r}",
                                0, base_version, meta, None)
        try:
            validate_update(delta, self.strategy.expected_update(self.run.head or {}), max_norm=self.cfg.max_update_norm)
        except UpdateRejected as exc:
            return self._record(round_no, device_id, now, False, exc.reason, num_samples, base_version, meta, None)
        return self._record(round_no, device_id, now, True, "accepted", num_samples, base_version, meta, delta)

    def _record(self, round_no, device_id, now, ok, reason, n, base, meta, delta) -> Verdict:
        if self.cfg.mode == "sync":   # an answer proves the task arrived, even before its PUBACK is handled
            self.store.mark_task_sent(self.run_id, round_no, device_id)
        fresh = self.store.add_update(self.run_id, round_no, UpdateRow(device_id, now, ok, None if ok else reason,
                                                                        n, base, dict(meta), delta))
        if not fresh:   # async: one update per device per window
            first = self.store.update_row(self.run_id, round_no, device_id)
            return Verdict(first.accepted, first.reason or "accepted", duplicate=True)
        return Verdict(ok, reason)

    # -- async (FedBuff) ---------------------------------------------------
    def _step_async(self, now: float, clients: Sequence[ClientInfo]) -> tuple[list[Task], list[RoundOutcome]]:
        """One round row per aggregation window; idle eligible clients get a task from the current version."""
        run = self.run
        if run.round_no >= self.cfg.rounds and self._window_done(run):
            self._finish_run()
            return [], []
        if run.round_no == 0:
            self.store.start_round(self.run_id, 1, now, now + self.cfg.deadline_s, (), {})
            run = self.run
        cur = self.store.round(self.run_id, run.round_no)
        if cur is None:
            self.store.start_round(self.run_id, run.round_no, now, now + self.cfg.deadline_s, (), {})
            cur = self.store.round(self.run_id, run.round_no)
        elif cur.status != "running":   # a crash after a window aggregated, before the next one opened
            self.store.start_round(self.run_id, cur.round_no + 1, now, now + self.cfg.deadline_s, (), {},
                                   tasks_sent=cur.tasks_sent - {u.device_id for u in
                                                                self.store.updates(self.run_id, cur.round_no)})
            cur = self.store.round(self.run_id, cur.round_no + 1)
        online = {c.device_id for c in clients if c.online}
        busy = self._busy(cur, online)
        room = self.cfg.clients - len(busy)
        if room <= 0:
            return [], []
        sel = select(clients, self.cfg.policy(), self.rng, exclude=sorted(busy))
        devices = sel.selected[:room]
        why = why_waiting(sel, 1) if not devices and not busy else None   # nobody is training: say why
        if why != run.waiting:
            self.store.update_run(self.run_id, waiting=why)
        self._note_sizing(cur.round_no, Selection(devices, sel.steps, sel.excluded,
                                                  {d: w for d, w in sel.lowered.items() if d in devices}))
        return self._tasks(cur.round_no, devices, sel.steps, run.global_version, now + self.cfg.deadline_s,
                           run.head or {}), []

    def _window_done(self, run) -> bool:
        cur = self.store.round(self.run_id, run.round_no)
        return cur is None or cur.status != "running"

    def _busy(self, cur, online: set[str]) -> set[str]:
        """Online devices holding a task of this window that has not produced an update yet."""
        got = {u.device_id for u in self.store.updates(self.run_id, cur.round_no)}
        return {d for d in cur.tasks_sent if d not in got and d in online}

    def _on_update_async(self, now, device_id, round_no, base_version, num_samples, delta, meta) -> Verdict:
        run = self.run
        staleness = run.global_version - base_version
        if staleness < 0:
            return Verdict(False, f"base version {base_version} is ahead of global {run.global_version}")
        if staleness > self.cfg.max_staleness:
            return self._record(run.round_no, device_id, now, False,
                                f"stale: {staleness} versions behind (max {self.cfg.max_staleness})",
                                num_samples, base_version, meta, None)
        meta = {**meta, "staleness": staleness, "task_round": round_no}
        v = self._check_and_record(run.round_no, device_id, now, num_samples, base_version, delta, meta)
        return v

    def maybe_aggregate_async(self, now: float) -> RoundOutcome | None:
        """Aggregate once ``buffer`` accepted updates are in; outstanding tasks carry over."""
        run = self.run
        if self.cfg.mode != "async" or run is None or run.status != "running":
            return None
        cur = self.store.round(self.run_id, run.round_no)
        if cur is None or cur.status != "running":
            return None
        all_ups = self.store.updates(self.run_id, cur.round_no)
        ups = [u for u in all_ups if u.accepted]
        if len(ups) < self.cfg.buffer:
            return None
        results = [FitResult(u.update, u.num_samples, int(u.meta.get("staleness", 0)), u.device_id) for u in ups]
        failures = [FitFailure(u.device_id, u.reason or "rejected") for u in all_ups if not u.accepted]
        metrics = {"received": len(ups), "staleness": [r.staleness for r in results], **_update_metrics(ups),
                   "duration_s": round(now - cur.started, 3)}
        out = self._apply(cur.round_no, results, failures, metrics)
        if cur.round_no < self.cfg.rounds:
            nxt = cur.round_no + 1
            got = {u.device_id for u in all_ups}
            self.store.start_round(self.run_id, nxt, now, now + self.cfg.deadline_s, (), {},
                                   tasks_sent=cur.tasks_sent - got)
        else:
            self._finish_run()
        return out


def _site_metrics(ups: list[UpdateRow]) -> dict[str, Any]:
    """Per site: the relay, the boards its one update stood for, their samples and its bytes."""
    return {str(u.meta["site"]): {"relay": u.device_id, "boards": sorted(u.meta["contributors"]),
                                  "samples": int(u.num_samples), "bytes": int(u.meta.get("bytes", 0))}
            for u in ups if is_site_row(u)}


def _update_metrics(ups: list[UpdateRow]) -> dict[str, Any]:
    losses = [u.meta.get("train_loss") for u in ups if isinstance(u.meta.get("train_loss"), (int, float))]
    sizes = [u.meta.get("bytes") for u in ups if isinstance(u.meta.get("bytes"), int)]
    return {"mean_train_loss": round(float(np.mean(losses)), 6) if losses else None,
            "uplink_bytes": int(sum(sizes)) if sizes else 0,
            "samples": int(sum(u.num_samples for u in ups))}
