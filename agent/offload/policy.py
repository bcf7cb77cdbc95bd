"""Per-request offload decisions (pure): answer locally when the board can, offload when it should.

Inputs: the local answer's confidence and latency, the policy the controller set, the
measured round trip to the workers (TCP-style SRTT/RTTVAR estimator) and the workers'
queue hint, and the request's deadline. Output: which path answers, and why. A request
is never lost: if offloading cannot fit the deadline, the local answer is returned and
marked low-confidence.
"""
from __future__ import annotations

from dataclasses import dataclass

LOCAL = "local"
OFFLOAD = "offload"
LOCAL_LOW = "local_low_confidence"


@dataclass(frozen=True)
class OffloadPolicy:
    enabled: bool = False
    threshold: float = 0.8          # offload when confidence < threshold (1.0: offload every request)
    mode: str = "features"          # features (split computing) | raw
    deadline_ms: float = 200.0      # default per-request deadline
    margin_ms: float = 5.0          # safety margin kept for the local fallback
    rtt_k: float = 2.0              # expected remote = srtt + k * rttvar + queue hint

    def __post_init__(self) -> None:
        if not (0.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.mode not in ("features", "raw"):
            raise ValueError(f"mode must be 'features' or 'raw', got {self.mode!r}")
        if self.deadline_ms <= 0:
            raise ValueError("deadline_ms must be > 0")


class RttEstimator:
    """RFC 6298-style smoothed round trip and its variation, in milliseconds."""

    def __init__(self, alpha: float = 0.125, beta: float = 0.25) -> None:
        self.alpha, self.beta = alpha, beta
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.samples = 0

    def observe(self, rtt_ms: float) -> None:
        if rtt_ms < 0:
            return
        if self.srtt is None:
            self.srtt, self.rttvar = rtt_ms, rtt_ms / 2
        else:
            self.rttvar = (1 - self.beta) * self.rttvar + self.beta * abs(self.srtt - rtt_ms)
            self.srtt = (1 - self.alpha) * self.srtt + self.alpha * rtt_ms
        self.samples += 1

    def timeout_penalty(self, deadline_ms: float) -> None:
        """A timed-out offload counts as a round trip at least as long as the deadline."""
        self.observe(max(deadline_ms, (self.srtt or 0.0) * 2))


@dataclass(frozen=True)
class Decision:
    path: str
    reason: str
    expected_remote_ms: float | None = None


def expected_remote_ms(rtt: RttEstimator, policy: OffloadPolicy, queue_hint_ms: float) -> float | None:
    if rtt.srtt is None:
        return None
    return rtt.srtt + policy.rtt_k * rtt.rttvar + max(0.0, queue_hint_ms)


def decide(confidence: float, local_latency_ms: float, policy: OffloadPolicy, rtt: RttEstimator,
           link_up: bool, deadline_ms: float | None = None, queue_hint_ms: float = 0.0,
           routed_ms: float | None = None, no_route: str | None = None) -> Decision:
    """``routed_ms``/``no_route``: the per-worker router's answer when workers are known
    (agent/offload/routing.py) — its expected completion, or why no worker fits; otherwise the
    shared-subscription estimate (one RTT estimator for all workers) is used."""
    deadline = policy.deadline_ms if deadline_ms is None else deadline_ms
    if not policy.enabled:
        return Decision(LOCAL, "offload disabled")
    if confidence >= policy.threshold and policy.threshold < 1.0:  # threshold 1.0 = offload everything
        return Decision(LOCAL, f"confident ({confidence:.2f} >= {policy.threshold:.2f})")
    if not link_up:
        return Decision(LOCAL_LOW, "link down")
    remaining = deadline - local_latency_ms - policy.margin_ms
    if no_route is not None:
        return Decision(LOCAL_LOW, no_route)
    exp = routed_ms if routed_ms is not None else expected_remote_ms(rtt, policy, queue_hint_ms)
    if exp is None:
        # no measurement yet: try once if there is any room at all; the timeout falls back locally
        if remaining > 0:
            return Decision(OFFLOAD, "low confidence; no round-trip measurement yet", None)
        return Decision(LOCAL_LOW, "no time left before the deadline")
    if exp > remaining:
        return Decision(LOCAL_LOW, f"remote ~{exp:.1f} ms would miss the deadline ({remaining:.1f} ms left)", exp)
    return Decision(OFFLOAD, f"low confidence ({confidence:.2f} < {policy.threshold:.2f}), remote ~{exp:.1f} ms fits",
                    exp)
