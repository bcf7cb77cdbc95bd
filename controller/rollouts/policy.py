"""Staged rollouts, decided: waves, canary gate, failure budget, fleet metrics (pure).

Rules, in the order they are applied on every tick:

1. A rollout's devices are cut into waves: the canary (``ceil(canary * n)`` devices, at
   least one when ``canary > 0``), then the rest in waves of ``batch`` (0 = all at once).
   ``by_site`` (SwarmSync's hierarchy, docs/sites.md): the canary is one board per site, then
   the sites follow ``sites_per_wave`` at a time, each wave every remaining board of its sites
   (so a site's relay pulls a patch once, for the canary, and serves the rest of the site from
   its cache); boards with no site count as one site of their own.
2. Failures (a device reported ``failed`` or ``rolled_back``, or stayed online but did
   not finish within ``wave_timeout_s``) are counted over every released wave. More than
   ``max_failures`` aborts the rollout.
3. Fleet metrics: when at least ``min_metric_devices`` updated devices report a live mean
   confidence both before and after, a mean fall of more than ``max_confidence_drop``
   aborts the rollout; likewise a mean fall of the devices' shadow-evaluation accuracy
   (new vs serving model, as each device measured it) of more than ``max_accuracy_drop``.
   Each device passes its own gate with its own bound; the fleet can still be worse off.
4. A wave is finished when every device of it that is online has a final status. The
   canary must have at least one device ``applied`` to open the next wave; a canary that
   reaches its timeout with none aborts. Offline devices never hold a wave back: their
   desired version is set, and they update when they return.
5. Soak: a finished wave counts as healthy only ``soak_s`` after it finished (``soak_started``,
   persisted by the runner). Rules 2 and 3 keep running over the soak on the updated devices'
   live telemetry, so a device whose model degrades after "applied" stops the rollout before
   the next wave. The wave timeout does not cut a soak short.
6. The last wave finished and soaked → ``done``.

Abort means: every device of the rollout is sent back to the version it ran before
(the runner sets its desired bundle back), and unreleased waves are skipped.
The runner (``rollout_runner.py``) acts on these decisions; this module never does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any, Mapping, Sequence

# what a board says (agent/updates/modelstore.py → "refused: " + protocol/patch.py's PatchError) when the
# artifact's own bytes are bad: a broken or missing signature, a hash that does not match, a malformed
# file. Such an artifact is quarantined. Not in the list, because they say nothing about the bytes: a key
# the board does not trust (its configuration), wrong base, not newer, already installed, size limits.
INTEGRITY_REASONS = ("unsigned", "bad signature", "signature is not valid", "signature must be",
                     "unsupported signature", "payload hash", "does not decompress", "decompressed to the wrong",
                     "sha-256 mismatch", "manifest hash mismatch", "does not match the target manifest",
                     "truncated patch", "not an edgefleet patch", "unsupported patch format", "patch manifest",
                     "outside the payload", "carries no manifest", "target manifest", "neither in the patch nor")


def is_integrity_refusal(reason: str | None) -> bool:
    """True when a board refused an artifact because of its content (integrity or signature)."""
    if not reason or not reason.startswith("refused:"):
        return False
    r = reason.lower()
    return "not trusted" not in r and any(k in r for k in INTEGRITY_REASONS)


FINAL = ("applied", "failed", "rolled_back", "timeout", "skipped", "superseded")
FAILED = ("failed", "rolled_back", "timeout")


class RolloutConfigError(ValueError):
    pass


@dataclass(frozen=True)
class RolloutPolicy:
    canary: float = 0.1
    batch: int = 0
    max_failures: int = 0
    wave_timeout_s: float = 600.0
    max_confidence_drop: float | None = None
    max_accuracy_drop: float | None = None
    min_metric_devices: int = 1
    soak_s: float = 0.0     # 0: a finished wave counts at once (registries made before soaking)
    by_site: bool = False   # waves by site: canary = one board per site, then sites_per_wave sites a wave
    sites_per_wave: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.canary < 1):
            raise RolloutConfigError(f"canary must be a fraction in [0, 1), got {self.canary}")
        if self.batch < 0:
            raise RolloutConfigError("batch must be >= 0 (0 = every remaining device in one wave)")
        if self.max_failures < 0:
            raise RolloutConfigError("max_failures must be >= 0")
        if not self.wave_timeout_s > 0:
            raise RolloutConfigError("wave_timeout_s must be > 0")
        if not 0 <= self.soak_s <= 7 * 86400:
            raise RolloutConfigError("soak_s must be 0 s .. 7 days")
        if not isinstance(self.sites_per_wave, int) or self.sites_per_wave < 1:
            raise RolloutConfigError("sites_per_wave must be an integer >= 1")
        for name in ("max_confidence_drop", "max_accuracy_drop"):
            v = getattr(self, name)
            if v is not None and not (0 <= v <= 1):
                raise RolloutConfigError(f"{name} must be in [0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return {"canary": self.canary, "batch": self.batch, "max_failures": self.max_failures,
                "wave_timeout_s": self.wave_timeout_s, "max_confidence_drop": self.max_confidence_drop,
                "max_accuracy_drop": self.max_accuracy_drop, "min_metric_devices": self.min_metric_devices,
                "soak_s": self.soak_s, "by_site": self.by_site, "sites_per_wave": self.sites_per_wave}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RolloutPolicy":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def plan_waves(devices: Sequence[str], canary: float, batch: int = 0) -> list[list[str]]:
    """Devices in the order given, cut into the canary wave and the following waves."""
    devs = list(dict.fromkeys(devices))
    if not devs:
        return []
    waves: list[list[str]] = []
    if canary > 0 and len(devs) > 1:
        n = min(len(devs) - 1, max(1, math.ceil(canary * len(devs))))
        waves.append(devs[:n])
        devs = devs[n:]
    size = batch or len(devs)
    waves.extend(devs[i:i + size] for i in range(0, len(devs), size))
    return waves


def plan_site_waves(devices: Sequence[tuple[str, str | None]], sites_per_wave: int = 1,
                    canary: bool = True) -> list[list[str]]:
    """``(device, site)`` pairs cut into waves by site: the canary takes the first board of every site
    (only of sites with more than one board when a site is all there is), then the sites follow in
    the order first seen, ``sites_per_wave`` at a time, each wave every remaining board of them."""
    by_site: dict[str | None, list[str]] = {}
    seen: set[str] = set()
    for dev, site in devices:
        if dev in seen:
            continue
        seen.add(dev)
        by_site.setdefault(site, []).append(dev)
    if not by_site:
        return []
    waves: list[list[str]] = []
    rest = {s: list(d) for s, d in by_site.items()}
    if canary and len(seen) > 1:
        first = [d[0] for d in rest.values()]
        if len(first) == len(seen):   # one board per site: the canary is the first site's
            first = first[:1]
        waves.append(first)
        for s in rest:
            if rest[s] and rest[s][0] in first:
                rest[s] = rest[s][1:]
    order = [s for s in rest if rest[s]]
    for i in range(0, len(order), sites_per_wave):
        wave = [d for s in order[i:i + sites_per_wave] for d in rest[s]]
        if wave:
            waves.append(wave)
    return waves


@dataclass(frozen=True)
class Slot:
    """One device of a rollout, as the runner sees it now."""
    device_id: str
    wave: int
    status: str                      # pending | released | offered | downloading | … | applied | failed …
    online: bool
    conf_before: float | None = None
    conf_after: float | None = None
    acc_before: float | None = None   # shadow evaluation on the device: the serving model …
    acc_after: float | None = None    # … and the new version, on the same samples


@dataclass(frozen=True)
class Decision:
    action: str                      # none | soak | release | abort | done
    wave: int = 0                    # the wave to release
    reason: str = ""
    timed_out: tuple[str, ...] = ()  # devices to mark 'timeout'
    figures: dict[str, Any] = field(default_factory=dict)


def decide(now: float, policy: RolloutPolicy, wave: int, wave_started: float, n_waves: int,
           slots: Sequence[Slot], soak_started: float | None = None) -> Decision:
    """What to do next for a running rollout whose wave ``wave`` opened at ``wave_started`` (and
    finished, starting its soak, at ``soak_started``). ``soak``: persist ``now`` as the soak's start."""
    released = [s for s in slots if s.wave <= wave]
    current = [s for s in slots if s.wave == wave]
    timed_out: tuple[str, ...] = ()
    if now - wave_started >= policy.wave_timeout_s:
        timed_out = tuple(s.device_id for s in current if s.online and s.status not in FINAL)
    failures = sum(1 for s in released if s.status in FAILED) + len(timed_out)
    figures: dict[str, Any] = {"failures": failures,
                               "applied": sum(1 for s in released if s.status == "applied")}
    for what, bound, get in (("confidence", policy.max_confidence_drop, lambda s: (s.conf_before, s.conf_after)),
                             ("accuracy", policy.max_accuracy_drop, lambda s: (s.acc_before, s.acc_after))):
        pairs = [get(s) for s in released
                 if s.status == "applied" and get(s)[0] is not None and get(s)[1] is not None]
        if not pairs:
            continue
        drop = sum(b - a for b, a in pairs) / len(pairs)
        figures[f"{what}_drop"] = round(drop, 5)
        if bound is not None and len(pairs) >= policy.min_metric_devices and drop > bound:
            return Decision("abort", wave, f"fleet {what} fell by {drop:.3f} on {len(pairs)} updated "
                                           f"device(s) (limit {bound})", timed_out, figures)
    if failures > policy.max_failures:
        return Decision("abort", wave, f"{failures} failure(s) > max_failures {policy.max_failures}",
                        timed_out, figures)
    open_ = [s for s in current if s.online and s.status not in FINAL and s.device_id not in timed_out]
    if open_:
        return Decision("none", wave, "", timed_out, figures)
    is_canary = wave == 0 and n_waves > 1 and policy.canary > 0
    if is_canary and not any(s.status == "applied" for s in current):
        if timed_out or now - wave_started >= policy.wave_timeout_s:
            return Decision("abort", wave, "no canary device completed the update", timed_out, figures)
        return Decision("none", wave, "waiting for a canary device to come online", timed_out, figures)
    if policy.soak_s > 0:
        if soak_started is None:
            return Decision("soak", wave, f"wave {wave} finished; soaking {policy.soak_s:g} s", timed_out, figures)
        left = policy.soak_s - (now - soak_started)
        if left > 0:
            figures["soak_left_s"] = round(left, 1)
            return Decision("none", wave, f"wave {wave} soaking, {left:.0f} s left", timed_out, figures)
    if wave + 1 < n_waves:
        return Decision("release", wave + 1, f"wave {wave} finished", timed_out, figures)
    return Decision("done", wave, "every wave finished", timed_out, figures)


def fleet_metrics(models: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fleet figures over the updated devices' live model telemetry (what each device reported for the
    new version since it started serving it): mean confidence, input error rate, p95 latency."""
    ms = [m for m in models if isinstance(m, Mapping)]
    n = sum(int(m.get("inferences") or 0) for m in ms)
    errs = sum(int(m.get("input_errors") or 0) for m in ms)
    confs = [float(m["mean_confidence"]) for m in ms if isinstance(m.get("mean_confidence"), (int, float))]
    p95 = [float(m["latency_ms"]["p95_ms"]) for m in ms if isinstance(m.get("latency_ms"), Mapping)
           and isinstance(m["latency_ms"].get("p95_ms"), (int, float))]
    out: dict[str, Any] = {"devices": len(ms), "inferences": n}
    if confs:
        out["mean_confidence"] = round(sum(confs) / len(confs), 5)
    if n + errs:
        out["error_rate"] = round(errs / (n + errs), 5)
    if p95:
        out["p95_latency_ms"] = round(max(p95), 3)
    return out
