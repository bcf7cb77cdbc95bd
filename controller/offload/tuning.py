"""The controller's feedback rule for offload thresholds (pure, documented, testable).

Every tuning period the controller looks at the workers' utilisation (busy time /
wall time, averaged over workers) and the fleet's offload figures, and moves the
confidence threshold by one step:

* workers above ``target_util + band`` → lower the threshold (offload less);
* workers below ``target_util - band`` and the remote model agrees with local answers
  less than ``min_disagreement`` of the time → nothing to gain: hold;
* workers below ``target_util - band`` otherwise → raise it (offload more);
* offload timeouts above ``max_timeout_rate`` → lower it regardless (the path is unhealthy).

The threshold stays within [lo, hi]. Returns the new threshold and the reason.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TuningRule:
    target_util: float = 0.7
    band: float = 0.1
    step: float = 0.02
    lo: float = 0.0
    hi: float = 0.99
    max_timeout_rate: float = 0.05
    min_disagreement: float = 0.01


def adjust_threshold(current: float, worker_util: float, timeout_rate: float, disagreement: float,
                     rule: TuningRule = TuningRule()) -> tuple[float, str]:
    def clamp(x: float) -> float:
        return round(min(rule.hi, max(rule.lo, x)), 4)

    if timeout_rate > rule.max_timeout_rate:
        return clamp(current - rule.step), f"timeouts {timeout_rate:.1%} > {rule.max_timeout_rate:.1%}: offload less"
    if worker_util > rule.target_util + rule.band:
        return clamp(current - rule.step), f"workers {worker_util:.0%} busy > {rule.target_util + rule.band:.0%}: offload less"
    if worker_util < rule.target_util - rule.band:
        if disagreement < rule.min_disagreement:
            return current, f"remote agrees with local {1 - disagreement:.1%} of the time: nothing to gain"
        return clamp(current + rule.step), f"workers {worker_util:.0%} busy < {rule.target_util - rule.band:.0%}: offload more"
    return current, "workers within the target band"
