"""Differential privacy for federated rounds (DP-FedAvg style) and its accounting.

Where the noise goes — *server side, on the aggregate* (central DP, McMahan et al. 2018), as a
wrapper around the run's own strategy (``DPFixedClipping``, after Flower's
``dp_fixed_clipping``): clip → the inner strategy aggregates → noise.

* Clients clip their whole update to L2 norm ``clip`` (``agent.learning.federated.clip_delta``, asked
  for in the task by the wrapper's ``configure``); the server clips again (``clip_update``) so
  a client that skipped it gains nothing.
* The inner strategy selects and combines the clipped updates (FedAvg's weighted mean, the
  median, Krum, …); Gaussian noise N(0, (z · clip · s)²) goes on every coordinate of that
  combined delta, *before* the strategy applies it (so FedAdam/FedYogi's optimizer state only
  ever sees noised deltas: the rest is post-processing). ``s`` is the inner strategy's
  ``dp_sensitivity``: 1/m for a uniform mean of m updates, the largest weight share for a
  weighted one; the robust aggregators use the 1/m convention (as Flower does) — the
  reported ε assumes it. The guarantee is *user-level*: it covers everything one device sent
  in a round. It protects the published global heads, not the individual updates in transit
  (those are trusted to the controller; client-side noise would be needed otherwise).
* The noise comes from OS entropy (``np.random.default_rng()`` with no seed), never from the
  run's seed: anyone who can read a run's config could otherwise recompute and subtract it.

Accounting — Rényi DP, composed additively over rounds:

* full participation (q = 1): ε_RDP(α) = α / (2 z²) (Mironov 2017, Prop. 7), any α > 1;
* Poisson client sampling with rate q < 1 (each device joins a round independently with
  probability q — only when the round runner really samples that way): the sampled Gaussian
  mechanism, for integer α ≥ 2 (Mironov, Talwar & Zhang 2019, §3.3)
  ε_RDP(α) = 1/(α−1) · ln Σ_{k=0..α} C(α,k) (1−q)^(α−k) q^k exp((k² − k) / (2 z²)).

RDP → (ε, δ) with the conversion of Balle et al. 2020 (Thm. 21), as Google's dp-accounting
does: ε = min_α [ε_RDP(α) + ln((α−1)/α) − (ln δ + ln α)/(α − 1)]. The tests check these
numbers against dp-accounting 0.6.0's ``RdpAccountant`` (values computed once and written
down). Selection by availability is *not* Poisson sampling: leave ``sample_rate`` at 1 then,
and the reported ε is an honest upper bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np

from .strategies import FitResult, Head, Strategy

ORDERS: tuple[float, ...] = (1.25, 1.5, 1.75, 2.5, 3.5) + tuple(float(a) for a in range(2, 65)) + (
    80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0)


def gaussian_rdp(z: float, alpha: float) -> float:
    """RDP of one Gaussian mechanism with noise multiplier z at order alpha."""
    return alpha / (2 * z * z)


def _logsumexp(xs: Sequence[float]) -> float:
    m = max(xs)
    if m == -math.inf:
        return -math.inf
    return m + math.log(sum(math.exp(x - m) for x in xs))


def sampled_gaussian_rdp(q: float, z: float, alpha: float) -> float:
    """RDP at integer order ``alpha`` of the Gaussian mechanism on a Poisson sample of rate q."""
    if not 0 <= q <= 1:
        raise ValueError("sampling rate q must be in [0, 1]")
    if z <= 0:
        return math.inf
    if q == 0:
        return 0.0
    if q == 1:
        return gaussian_rdp(z, alpha)
    if alpha != int(alpha) or alpha < 2:
        raise ValueError(f"the sampled Gaussian bound here needs an integer order >= 2, got {alpha}")
    a = int(alpha)
    lq, l1q = math.log(q), math.log1p(-q)
    terms = [math.lgamma(a + 1) - math.lgamma(k + 1) - math.lgamma(a - k + 1) + k * lq + (a - k) * l1q
             + (k * k - k) / (2 * z * z) for k in range(a + 1)]
    return _logsumexp(terms) / (a - 1)


def rdp_to_dp(rdp: Sequence[float], orders: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best order) for the RDP curve ``rdp`` over ``orders`` (Balle et al. 2020, Thm. 21)."""
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    best = (math.inf, math.nan)
    for r, a in zip(rdp, orders):
        if a <= 1 or not math.isfinite(r):
            continue
        eps = r + math.log((a - 1) / a) - (math.log(delta) + math.log(a)) / (a - 1)
        if eps < best[0]:
            best = (max(0.0, eps), a)
    return best


def epsilon(z: float, rounds: int, delta: float, orders: Sequence[float] = ORDERS,
            q: float = 1.0) -> tuple[float, float]:
    """(ε, best order) after ``rounds`` (sampled) Gaussian mechanisms with noise multiplier ``z``."""
    if rounds < 0:
        raise ValueError("rounds must be >= 0")
    if rounds == 0 or q == 0:
        return 0.0, math.nan
    if z <= 0:
        return math.inf, math.nan
    if q < 1:
        orders = [a for a in orders if a == int(a) and a >= 2]
    rdp = [rounds * sampled_gaussian_rdp(q, z, a) for a in orders]
    return rdp_to_dp(rdp, orders, delta)


@dataclass(frozen=True)
class DPConfig:
    clip: float = 1.0
    noise: float = 1.0        # noise multiplier z
    delta: float = 1e-5
    sample_rate: float = 1.0  # Poisson client sampling rate q (1: no amplification claimed)

    def __post_init__(self) -> None:
        if not (self.clip > 0 and self.noise >= 0 and 0 < self.delta < 1 and 0 < self.sample_rate <= 1):
            raise ValueError("dp needs clip > 0, noise >= 0, 0 < delta < 1, 0 < sample_rate <= 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, float] | None) -> "DPConfig | None":
        if not d:
            return None
        unknown = set(d) - {"clip", "noise", "delta", "sample_rate"}
        if unknown:
            raise ValueError(f"unknown dp settings: {', '.join(sorted(unknown))}")
        try:
            return cls(float(d.get("clip", 1.0)), float(d.get("noise", 1.0)), float(d.get("delta", 1e-5)),
                       float(d.get("sample_rate", 1.0)))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad dp settings: {exc}") from None


@dataclass(frozen=True)
class RoundPrivacy:
    """The privacy spent up to and including one round, for the round's metrics."""

    rounds: int
    epsilon: float
    delta: float
    order: float


class PrivacyAccountant:
    """Counts noised rounds of one run and reports (ε, δ) so far; state is one integer."""

    def __init__(self, cfg: DPConfig, rounds: int = 0) -> None:
        self.cfg, self.rounds = cfg, int(rounds)

    def spent(self) -> RoundPrivacy:
        eps, order = epsilon(self.cfg.noise, self.rounds, self.cfg.delta, q=self.cfg.sample_rate)
        return RoundPrivacy(self.rounds, eps, self.cfg.delta, order)

    def step(self) -> RoundPrivacy:
        """Account for one more noised aggregate; returns the total spent."""
        self.rounds += 1
        return self.spent()

    def to_state(self) -> dict[str, Any]:
        return {"dp_rounds": self.rounds}

    @classmethod
    def from_state(cls, cfg: DPConfig, state: Mapping[str, Any] | None) -> "PrivacyAccountant":
        return cls(cfg, int((state or {}).get("dp_rounds", 0)))


def l2_norm(u: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in u.values()))


def clip_update(u: Mapping[str, np.ndarray], clip: float) -> dict[str, np.ndarray]:
    """Scale the whole update (all tensors together) to L2 norm at most ``clip``; never mutates ``u``."""
    norm = l2_norm(u)
    s = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (np.asarray(v, np.float32) * s).astype(np.float32) for k, v in u.items()}


class DPFixedClipping(Strategy):
    """The run's strategy with central DP: clip every update to ``clip``, let the inner strategy
    select and combine, add N(0, (z · clip · sensitivity)²) to the combined delta, let the inner
    strategy apply it. State = the inner strategy's + the accountant's."""

    name = "dp_fixed_clipping"

    def __init__(self, inner: Strategy, cfg: DPConfig) -> None:
        self.inner, self.cfg = inner, cfg
        self.accountant = PrivacyAccountant(cfg)
        self._rng = np.random.default_rng()   # OS entropy; never a seed from the run's config

    @property
    def accept_failures(self) -> bool:  # type: ignore[override]
        return self.inner.accept_failures

    @property
    def site_weighting(self) -> str | None:  # type: ignore[override]
        """The inner strategy's: boards clip their own updates, so a site's mean of clipped updates
        is within the clip too (the server's clip leaves it as it is); noise goes on once, here."""
        return self.inner.site_weighting

    def configure(self, round_no: int, clients: Sequence[str], base: Mapping[str, Any] | None = None
                  ) -> dict[str, dict[str, Any]]:
        return {c: {**cfg, "dp": {"clip": self.cfg.clip}}
                for c, cfg in self.inner.configure(round_no, clients, base).items()}

    def task_tensors(self, global_head: Mapping[str, np.ndarray]) -> Head:
        return self.inner.task_tensors(global_head)

    def expected_update(self, global_head: Mapping[str, np.ndarray]) -> Head:
        return self.inner.expected_update(global_head)

    def select(self, results: Sequence[FitResult]) -> list[FitResult]:
        return self.inner.select([replace(r, update=clip_update(r.update, self.cfg.clip)) for r in results])

    def combine(self, results: Sequence[FitResult]) -> dict[str, np.ndarray] | None:
        d = self.inner.combine(results)
        if d is None:
            return None
        sigma = self.cfg.noise * self.cfg.clip * self.inner.dp_sensitivity(results)
        self.accountant.step()
        return {k: (np.asarray(v, np.float64) + self._rng.normal(0.0, sigma, np.shape(v))).astype(np.float32)
                if sigma > 0 else np.asarray(v, np.float32) for k, v in d.items()}

    def apply(self, global_head: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Head:
        return self.inner.apply(global_head, delta)

    def to_state(self) -> dict[str, Any]:
        state = {**self.inner.to_state(), **self.accountant.to_state()}
        if self.cfg.noise > 0 and self.accountant.rounds > 0:
            spent = self.accountant.spent()
            state.update(dp_epsilon=round(spent.epsilon, 4), dp_delta=spent.delta, dp_order=spent.order)
        return state

    def load_state(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state(state)
        self.accountant = PrivacyAccountant.from_state(self.cfg, state)
