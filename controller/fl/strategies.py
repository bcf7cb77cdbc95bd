"""Federated strategies: they *decide* how to configure a round and how to turn updates into
the next global head.

Flower's split: a strategy takes plain arrays and returns plain data or ``None`` (no new
model); the round runner owns transport, deadlines and persistence. Every strategy works on
*deltas* (local − global) with their weights (sample counts) and staleness (how many global
versions behind the client's base was), and keeps its own state serialisable
(``to_state()``/``from_state()``, JSON-safe) so a restarted controller resumes.

    configure(round_no, clients, base) -> {client: task config}   (the engine sends exactly this)
    aggregate(global_head, results, failures) -> new head | None

``results`` are ``FitResult``s or ``(delta, num_samples, staleness)`` tuples; ``failures``
are ``FitFailure``s the engine recorded (clients that went away, timed out or were rejected)
— data, not exceptions; ``accept_failures=False`` turns any of them into "no new model".
``validate_update`` is the one pure gate an arriving update passes before it is a result; it
raises ``UpdateRejected`` with the reason. Cross-cutting policies (DP) wrap a strategy
(``controller.fl.privacy.DPFixedClipping``) instead of replacing it.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Any, Mapping, Sequence, Union

import numpy as np

from protocol.fl import SITE_WEIGHTINGS  # noqa: F401 - re-exported: one list, on the wire

from . import aggregate as agg

Head = dict[str, np.ndarray]
Result = tuple[Mapping[str, np.ndarray], int, int]   # (delta, num_samples, staleness)


@dataclass(frozen=True)
class FitResult:
    update: Mapping[str, np.ndarray]   # delta: local head − the global head it started from
    num_samples: int
    staleness: int = 0                 # global versions between the client's base and now
    client_id: str = ""
    #: a site's pre-aggregated update (``update`` = the mean over these boards): board -> its samples
    contributors: Mapping[str, int] | None = None

    def boards(self) -> int:
        """How many boards this result stands for (1, or a site's contributors)."""
        return len(self.contributors) if self.contributors else 1


AnyResult = Union[FitResult, Result]


@dataclass(frozen=True)
class FitFailure:
    """A selected client that produced no usable update this round, and why."""
    client_id: str
    reason: str


class UpdateRejected(ValueError):
    """An arriving update may not be aggregated; ``reason`` says why (counted, answered, survived)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def validate_update(update: Mapping[str, np.ndarray], global_head: Mapping[str, np.ndarray], *,
                    max_norm: float | None = None, base_version: int | None = None,
                    current_version: int | None = None, max_staleness: int | None = None) -> float:
    """Check names, shapes, dtype, finiteness, L2 norm and version of one update; returns its
    L2 norm, or raises ``UpdateRejected``."""
    if base_version is not None and current_version is not None:
        s = current_version - base_version
        if s < 0:
            raise UpdateRejected(f"base version {base_version} is ahead of the global version {current_version}")
        if max_staleness is not None and s > max_staleness:
            raise UpdateRejected(f"stale: {s} versions behind (max {max_staleness})")
    if set(update) != set(global_head):
        raise UpdateRejected(f"tensor names {sorted(update)} do not match the global head {sorted(global_head)}")
    sq = 0.0
    for k in sorted(global_head):
        d = update[k]
        if not isinstance(d, np.ndarray):
            raise UpdateRejected(f"{k}: not an array")
        if d.shape != np.shape(global_head[k]):
            raise UpdateRejected(f"{k}: shape {list(d.shape)} != {list(np.shape(global_head[k]))}")
        if d.dtype.kind != "f":
            raise UpdateRejected(f"{k}: dtype {d.dtype} is not floating point")
        if not np.all(np.isfinite(d)):
            raise UpdateRejected(f"{k}: NaN or inf values")
        sq += float(np.sum(np.square(d, dtype=np.float64)))
    norm = math.sqrt(sq)
    if max_norm is not None and norm > max_norm:
        raise UpdateRejected(f"update L2 norm {norm:.3g} exceeds the bound {max_norm:.3g}")
    return norm


def as_fit_result(r: AnyResult) -> FitResult:
    if isinstance(r, FitResult):
        return r
    u, n, s = r
    return FitResult(u, int(n), int(s))


#: how a site relay may pre-aggregate a strategy's updates (``Strategy.site_weighting``):
#: "samples": the sample-weighted mean with the site's total samples as its weight (FedAvg family:
#: Σ_s N_s·mean_s / Σ_s N_s is the flat weighted mean exactly); "uniform": the plain mean with the
#: number of boards as its weight (SCAFFOLD's uniform means of Δy and Δc); None: never — every
#: board's update goes up on its own (robust aggregators need each update; async FedBuff weighs
#: each by its own staleness)


class Strategy:
    name = "base"
    #: whether (and how) a site relay may combine its boards' updates into one (see SITE_WEIGHTINGS)
    site_weighting: str | None = None
    #: settings every client's task carries (e.g. FedProx's mu)
    task_config: dict[str, Any] = {}
    #: False: any failure in the round means no new model (Flower's ``accept_failures``)
    accept_failures: bool = True

    # -- decide: the round's tasks --------------------------------------------------------
    def configure(self, round_no: int, clients: Sequence[str], base: Mapping[str, Any] | None = None
                  ) -> dict[str, dict[str, Any]]:
        """One task config per selected client: the runner's base settings plus the strategy's."""
        return {c: {**(base or {}), **self.task_config, "round": round_no} for c in clients}

    def task_tensors(self, global_head: Mapping[str, np.ndarray]) -> Head:
        """The tensors every task carries: the global head (SCAFFOLD adds its control variate)."""
        return dict(global_head)

    def expected_update(self, global_head: Mapping[str, np.ndarray]) -> Head:
        """What an update must look like (names and shapes): the global head's, by default."""
        return dict(global_head)

    # -- decide: the next model ------------------------------------------------------------
    def select(self, results: Sequence[FitResult]) -> list[FitResult]:
        """Which results take part (all, by default)."""
        return list(results)

    def combine(self, results: Sequence[FitResult]) -> dict[str, np.ndarray] | None:
        """The aggregated delta (the pseudo-gradient), or None for no new model."""
        raise NotImplementedError

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        """The next global head from the aggregated delta (plain addition; FedOpt steps an optimizer)."""
        return {k: (np.asarray(global_head[k], np.float32) + delta[k]).astype(np.float32) for k in global_head}

    def aggregate(self, global_head: Mapping[str, np.ndarray], results: Sequence[AnyResult],
                  failures: Sequence[Any] = ()) -> Head | None:
        if not results or (failures and not self.accept_failures):
            return None
        chosen = self.select([as_fit_result(r) for r in results])
        if not chosen:
            return None
        d = self.combine(chosen)
        return None if d is None else self.apply(global_head, d)

    def aggregate_deltas(self, global_head: Mapping[str, np.ndarray], results: Sequence[AnyResult]) -> Head | None:
        """``aggregate`` of a round without failures (tests and benchmarks)."""
        return self.aggregate(global_head, results, ())

    def dp_sensitivity(self, results: Sequence[FitResult]) -> float:
        """How far one client can move ``combine``'s output, per unit of (clipped) update norm;
        DP noise is scaled by it. 1/n is the uniform mean's; it is the convention Flower's DP
        wrappers use for every strategy, and an assumption for the robust aggregators."""
        return 1.0 / max(1, len(results))

    # -- state -----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        pass

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None, **params: Any) -> "Strategy":
        s = cls(**params)
        if state:
            s.load_state(state)
        return s

    def state(self) -> dict[str, Any]:  # the name the round runner uses
        return self.to_state()


class FedAvg(Strategy):
    """Sample-weighted mean of the updates (McMahan et al. 2017), stale ones discounted."""

    name = "fedavg"
    #: the server step (plain, momentum, Adam/Yogi) acts on the mean, so a partial weighted sum is exact
    site_weighting = "samples"

    def __init__(self, staleness: str = "sqrt") -> None:
        agg.staleness_weight(0, staleness)  # validates the name
        self.staleness = staleness

    def weights(self, results: Sequence[FitResult]) -> list[float]:
        return [r.num_samples * agg.staleness_weight(r.staleness, self.staleness) for r in results]

    def combine(self, results: Sequence[FitResult]) -> dict[str, np.ndarray]:
        return agg.fast_weighted_average([r.update for r in results], self.weights(results))

    def dp_sensitivity(self, results: Sequence[FitResult]) -> float:
        """A weighted mean moves by at most the largest weight share *of one board* times one
        update's norm (a site's aggregate is many boards: its contributors' weights count)."""
        w = [n * agg.staleness_weight(r.staleness, self.staleness)
             for r in results for n in (r.contributors.values() if r.contributors else (r.num_samples,))]
        return max(w) / sum(w)


class FedProx(FedAvg):
    """FedAvg aggregation; clients add mu/2 ||w - w_global||^2 to their loss (Li et al. 2020)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, staleness: str = "sqrt") -> None:
        super().__init__(staleness)
        if mu < 0:
            raise ValueError("mu must be >= 0")
        self.mu = mu
        self.task_config = {"prox_mu": mu}


class FedOpt(FedAvg):
    """Server optimizers on the pseudo-gradient (the averaged delta), Reddi et al. 2021:
    m ← β1 m + (1−β1) Δ;  v ← second_moment(v, Δ);  w ← w + η m / (√v + τ), with v₀ = τ².

    ``bias_correction``: Adam's (Kingma & Ba 2015) m̂ = m/(1−β1ᵗ), v̂ = v/(1−β2ᵗ), w ← w + η m̂/(√v̂ + τ),
    v₀ = 0 — without it the first rounds' steps are (1−β1) times too small. ``flower``: exactly
    what ``flwr.server.strategy.FedAdam`` computes (v₀ = 0, and its step
    η·√(1−β2^(t+1))/(1−β1^(t+1)) · m/(√v + τ), t the 1-based round) — for comparisons."""

    def __init__(self, eta: float = 0.1, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3,
                 staleness: str = "sqrt", bias_correction: bool = False, flower: bool = False) -> None:
        super().__init__(staleness)
        if eta <= 0 or not 0 <= beta1 < 1 or not 0 <= beta2 < 1 or tau <= 0:
            raise ValueError("FedOpt needs eta > 0, 0 <= beta1, beta2 < 1, tau > 0")
        if not isinstance(bias_correction, bool) or not isinstance(flower, bool):
            raise ValueError("bias_correction and flower must be true or false")
        if bias_correction and flower:
            raise ValueError("give bias_correction or flower, not both (flower has its own correction)")
        self.eta, self.beta1, self.beta2, self.tau = eta, beta1, beta2, tau
        self.bias_correction, self.flower = bias_correction, flower
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        out = {}
        self.t += 1
        t = self.t
        v0 = 0.0 if (self.bias_correction or self.flower) else self.tau ** 2
        for k, g in global_head.items():
            d = np.asarray(delta[k], np.float64)
            m = np.asarray(self.m.get(k, np.zeros_like(d)), np.float64)
            v = np.asarray(self.v.get(k, np.full_like(d, v0)), np.float64)
            if m.shape != d.shape:  # the head changed shape (a new bundle): restart the optimizer
                m, v = np.zeros_like(d), np.full_like(d, v0)
            m = self.beta1 * m + (1 - self.beta1) * d
            v = self.second_moment(v, d)
            self.m[k], self.v[k] = m.astype(np.float32), v.astype(np.float32)
            if self.flower:
                eta_t = self.eta * math.sqrt(1 - self.beta2 ** (t + 1.0)) / (1 - self.beta1 ** (t + 1.0))
                step = eta_t * m / (np.sqrt(v) + self.tau)
            elif self.bias_correction:
                step = self.eta * (m / (1 - self.beta1 ** t)) / (np.sqrt(v / (1 - self.beta2 ** t)) + self.tau)
            else:
                step = self.eta * m / (np.sqrt(v) + self.tau)
            out[k] = (np.asarray(g, np.float64) + step).astype(np.float32)
        return out

    def to_state(self) -> dict[str, Any]:
        return {"m": {k: v.tolist() for k, v in self.m.items()}, "v": {k: v.tolist() for k, v in self.v.items()},
                "t": self.t}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.m = {k: np.asarray(v, np.float32) for k, v in (state.get("m") or {}).items()}
        self.v = {k: np.asarray(v, np.float32) for k, v in (state.get("v") or {}).items()}
        self.t = int(state.get("t") or (1 if self.m else 0))


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v, d):
        return self.beta2 * v + (1 - self.beta2) * d * d


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v, d):
        d2 = d * d
        return v - (1 - self.beta2) * d2 * np.sign(v - d2)


class Median(Strategy):
    """Coordinate-wise median (Yin et al. 2018): robust to a minority of arbitrary updates."""

    name = "median"

    def combine(self, results):
        return agg.coordinate_median([r.update for r in results])


class TrimmedMean(Strategy):
    """Per coordinate, drop the floor(beta·n) largest and smallest values and average the rest."""

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        if not 0 <= beta < 0.5:
            raise ValueError("beta must be in [0, 0.5)")
        self.beta = beta

    def combine(self, results):
        return agg.trimmed_mean([r.update for r in results], self.beta)


class Krum(Strategy):
    """Multi-Krum (Blanchard et al. 2017): average the m updates closest to their neighbours;
    m = 1 is Krum. With too few updates to judge (n <= f + 2) it falls back to the median."""

    name = "krum"

    def __init__(self, f: int = 1, m: int = 1) -> None:
        if f < 0 or m < 1:
            raise ValueError("Krum needs f >= 0 and m >= 1")
        self.f, self.m = f, m
        self.last_chosen: list[int] = []

    def combine(self, results):
        ups = [r.update for r in results]
        if len(ups) <= self.f + 2:
            self.last_chosen = list(range(len(ups)))
            return agg.coordinate_median(ups)
        avg, self.last_chosen = agg.multi_krum(ups, [r.num_samples for r in results], self.f,
                                               min(self.m, len(ups)))
        return avg


class MultiKrum(Krum):
    name = "multikrum"

    def __init__(self, f: int = 1, m: int = 3) -> None:
        super().__init__(f, m)


class FedBuff(FedAvg):
    """Buffered asynchronous aggregation (Nguyen et al. 2022): once ``buffer_size`` usable
    updates are in, their staleness-weighted mean times the server rate ``eta``. Updates more
    than ``max_staleness`` versions behind are dropped (``last_dropped``); with fewer than
    ``buffer_size`` left there is no new model yet."""

    name = "fedbuff"
    site_weighting = None   # each update weighed by its own staleness, and it runs async

    def __init__(self, eta: float = 1.0, staleness: str = "sqrt", buffer_size: int = 1,
                 max_staleness: int | None = None) -> None:
        super().__init__(staleness)
        if eta <= 0 or buffer_size < 1 or (max_staleness is not None and max_staleness < 0):
            raise ValueError("FedBuff needs eta > 0, buffer_size >= 1, max_staleness >= 0")
        self.eta, self.buffer_size, self.max_staleness = eta, buffer_size, max_staleness
        self.last_dropped: list[int] = []

    def select(self, results):
        ok = [self.max_staleness is None or r.staleness <= self.max_staleness for r in results]
        self.last_dropped = [i for i, good in enumerate(ok) if not good]
        keep = [r for r, good in zip(results, ok) if good]
        return keep if len(keep) >= self.buffer_size else []

    def combine(self, results):
        d = super().combine(results)
        return {k: (self.eta * v).astype(np.float32) for k, v in d.items()}

    def dp_sensitivity(self, results):
        return self.eta * super().dp_sensitivity(results)


# -- non-IID: strategies that change the *server* step ----------------------------------------
# * FedAvgM — Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data distribution"
# (and Cheng et al. 2023, "Momentum benefits non-IID federated learning simply and provably"):
# server momentum on the averaged delta Δ, v ← β v + Δ; w ← w + η v. Flower's ``FedAvgM``
# writes the same step with the pseudo-gradient −Δ.
# * SCAFFOLD — Karimireddy et al. 2020, Algorithm 1 with option II. The server keeps a control
# variate c per federated tensor; the task carries it (``task_tensors``: ``cv.<name>``); the
# client corrects every local gradient by (c − cᵢ), then sends its model delta Δyᵢ *and* its
# control-variate delta Δcᵢ (``cv.<name>`` tensors in the same update). The server steps
# x ← x + η_g · mean(Δy) and c ← c + |S|/N · mean(Δc), N the fleet size (``num_clients``, or
# the number of distinct devices seen so far when 0). Each client's own cᵢ lives on the device
# (``agent.learning.scaffold``), across rounds and restarts.

CV = "cv."   # tensor-name prefix of control variates on the wire


class FedAvgM(FedAvg):
    """Sample-weighted mean, then server momentum: v ← β v + Δ;  w ← w + η v."""

    name = "fedavgm"

    def __init__(self, eta: float = 1.0, beta: float = 0.9, staleness: str = "sqrt") -> None:
        super().__init__(staleness)
        if eta <= 0 or not 0 <= beta < 1:
            raise ValueError("FedAvgM needs eta > 0 and 0 <= beta < 1")
        self.eta, self.beta = eta, beta
        self.v: dict[str, np.ndarray] = {}

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        out = {}
        for k, g in global_head.items():
            d = np.asarray(delta[k], np.float64)
            v = np.asarray(self.v.get(k, np.zeros_like(d)), np.float64)
            if v.shape != d.shape:   # a new head shape: restart the momentum
                v = np.zeros_like(d)
            v = self.beta * v + d
            self.v[k] = v.astype(np.float32)
            out[k] = (np.asarray(g, np.float64) + self.eta * v).astype(np.float32)
        return out

    def dp_sensitivity(self, results: Sequence[FitResult]) -> float:
        return self.eta * super().dp_sensitivity(results)

    def to_state(self) -> dict[str, Any]:
        return {"v": {k: v.tolist() for k, v in self.v.items()}}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.v = {k: np.asarray(v, np.float32) for k, v in (state.get("v") or {}).items()}


class Scaffold(FedAvg):
    """SCAFFOLD's server (option II): uniform means of Δy and Δc over the round's clients."""

    name = "scaffold"
    #: Δy and Δc are uniform means over the round's boards: a site sends their mean over its boards
    #: with the board count as weight (Σ_s k_s·mean_s / Σ_s k_s is the flat mean), |S| counts boards
    site_weighting = "uniform"

    def __init__(self, eta: float = 1.0, num_clients: int = 0) -> None:
        super().__init__("constant")
        if eta <= 0 or not isinstance(num_clients, int) or num_clients < 0:
            raise ValueError("SCAFFOLD needs eta > 0 and num_clients >= 0 (0: the devices seen so far)")
        self.eta, self.num_clients = eta, num_clients
        self.c: dict[str, np.ndarray] = {}
        self.seen: set[str] = set()
        self.task_config = {"scaffold": True}

    # -- what travels ----------------------------------------------------------------------
    def control(self, global_head: Mapping[str, np.ndarray]) -> Head:
        """The server control variate c (zeros until the first round aggregated)."""
        return {k: (self.c[k] if k in self.c and self.c[k].shape == np.shape(v)
                    else np.zeros(np.shape(v), np.float32)) for k, v in global_head.items()}

    def task_tensors(self, global_head: Mapping[str, np.ndarray]) -> Head:
        return {**{k: np.asarray(v, np.float32) for k, v in global_head.items()},
                **{CV + k: v for k, v in self.control(global_head).items()}}

    def expected_update(self, global_head: Mapping[str, np.ndarray]) -> Head:
        return self.task_tensors(global_head)

    # -- decide ----------------------------------------------------------------------------
    def combine(self, results: Sequence[FitResult]) -> dict[str, np.ndarray]:
        ys = [{k: v for k, v in r.update.items() if not k.startswith(CV)} for r in results]
        cs = [{k[len(CV):]: v for k, v in r.update.items() if k.startswith(CV)} for r in results]
        if any(set(c) != set(y) for c, y in zip(cs, ys)):
            raise ValueError("a SCAFFOLD update must carry a control-variate delta for every tensor")
        ones = [float(r.boards()) for r in results]   # a site's mean stands for its boards
        dy = agg.weighted_average(ys, ones)
        dc = agg.weighted_average(cs, ones)
        n_boards = int(sum(ones))
        for r in results:
            self.seen.update(r.contributors or ((r.client_id,) if r.client_id else ()))
        n_total = self.num_clients or max(len(self.seen), n_boards)
        frac = min(1.0, n_boards / n_total)
        for k, v in dc.items():
            old = self.c.get(k)
            base = old.astype(np.float64) if old is not None and old.shape == v.shape else np.zeros(v.shape)
            self.c[k] = (base + frac * v.astype(np.float64)).astype(np.float32)
        return {k: (self.eta * v.astype(np.float64)).astype(np.float32) for k, v in dy.items()}

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        return {k: (np.asarray(global_head[k], np.float32) + delta[k]).astype(np.float32)
                for k in global_head if not k.startswith(CV)}

    def dp_sensitivity(self, results: Sequence[FitResult]) -> float:
        return self.eta / max(1, sum(r.boards() for r in results))

    # -- state -----------------------------------------------------------------------------
    def to_state(self) -> dict[str, Any]:
        return {"c": {k: v.tolist() for k, v in self.c.items()}, "seen": sorted(self.seen)}

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.c = {k: np.asarray(v, np.float32) for k, v in (state.get("c") or {}).items()}
        self.seen = set(state.get("seen") or ())


STRATEGIES: dict[str, type[Strategy]] = {c.name: c for c in (FedAvg, FedProx, FedAdam, FedYogi, Median, TrimmedMean,
                                                               Krum, MultiKrum, FedBuff, FedAvgM, Scaffold)}




def make(name: str, **params: Any) -> Strategy:
    """The strategy called ``name`` (a key of ``STRATEGIES``) built with ``params``; every strategy
    also takes ``accept_failures`` (bool, default true)."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {', '.join(sorted(STRATEGIES))}") from None
    accept = params.pop("accept_failures", True)
    if not isinstance(accept, bool):
        raise ValueError(f"bad parameters for {name}: accept_failures must be true or false, got {accept!r}")
    try:
        s = cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for {name}: {exc}") from None
    s.accept_failures = accept
    return s
