"""Client selection and compute-aware task sizing for federated rounds (pure).

Selection reads what the registry knows from live telemetry: online, enough labelled
samples, not overloaded. Task sizing follows the FedCompass idea, one way only: the run's
local steps (``--steps``) are what every device is asked for; a device whose measured
training speed (samples/s it reported) cannot do that many inside the deadline gets fewer,
and ``Selection.lowered`` says why. Sizing never raises the steps: runs stay reproducible
and no device drifts further than asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import random
from typing import Any, Mapping, Sequence


@dataclass(frozen=True)
class ClientInfo:
    device_id: str
    online: bool
    labelled_samples: int = 0
    cpu_percent: float | None = None
    samples_per_s: float | None = None   # measured local training speed
    last_seen_age_s: float = 0.0
    group: str | None = None

    @classmethod
    def from_registry(cls, device: Any, now: float) -> "ClientInfo":
        t = device.telemetry or {}
        learning = t.get("learning") or {}
        return cls(device.id, bool(device.online), int(learning.get("labelled_samples") or 0),
                   t.get("cpu_percent"), learning.get("samples_per_s"), max(0.0, now - device.last_seen),
                   device.group)


@dataclass(frozen=True)
class SelectionPolicy:
    clients: int = 10                 # how many to pick (at most)
    min_samples: int = 1
    max_cpu_percent: float = 90.0
    max_silence_s: float = 120.0
    group: str | None = None
    devices: tuple[str, ...] | None = None   # round start --to/--tag: only these ids
    deadline_s: float = 60.0
    local_steps: int = 20             # asked of every device; only ever lowered to fit the deadline
    min_steps: int = 1
    batch_size: int = 32
    deadline_fill: float = 0.6        # aim to finish in this fraction of the deadline


@dataclass(frozen=True)
class Selection:
    selected: tuple[str, ...]
    steps: Mapping[str, int]
    excluded: Mapping[str, str]       # device → reason
    lowered: Mapping[str, str] = field(default_factory=dict)   # device → why it got fewer steps than asked


def eligible(c: ClientInfo, p: SelectionPolicy) -> str | None:
    """None if the client may take part, else the reason it may not."""
    if not c.online:
        return "offline"
    if p.group is not None and c.group != p.group:
        return f"not in group {p.group}"
    if p.devices is not None and c.device_id not in p.devices:
        return "not picked (--to/--tag)"
    if c.last_seen_age_s > p.max_silence_s:
        return f"silent for {c.last_seen_age_s:.0f}s"
    if c.labelled_samples < p.min_samples:
        return f"{c.labelled_samples} labelled samples < {p.min_samples}"
    if c.cpu_percent is not None and c.cpu_percent > p.max_cpu_percent:
        return f"busy (cpu {c.cpu_percent:.0f}% > {p.max_cpu_percent:.0f}%)"
    return None


def size_task(c: ClientInfo, p: SelectionPolicy) -> tuple[int, str | None]:
    """``p.local_steps``, lowered when this client's speed cannot do them in ``deadline_fill ×
    deadline``; with the reason when it was lowered."""
    if not c.samples_per_s or c.samples_per_s <= 0:
        return p.local_steps, None
    budget_samples = c.samples_per_s * p.deadline_s * p.deadline_fill
    fit = max(p.min_steps, int(budget_samples // max(1, p.batch_size)))
    if fit >= p.local_steps:
        return p.local_steps, None
    return fit, (f"{c.samples_per_s:g} samples/s fits {fit} steps of batch {p.batch_size} in "
                 f"{p.deadline_fill:.0%} of the {p.deadline_s:g}s deadline")


def size_steps(c: ClientInfo, p: SelectionPolicy) -> int:
    """Local steps for this client: ``p.local_steps`` or fewer (``size_task``)."""
    return size_task(c, p)[0]


def select(clients: Sequence[ClientInfo], p: SelectionPolicy, rng: random.Random | None = None,
           exclude: Sequence[str] = ()) -> Selection:
    """Pick up to ``p.clients`` eligible clients at random (seeded for reproducible runs)."""
    rng = rng or random.Random(0)
    excluded: dict[str, str] = {}
    pool: list[ClientInfo] = []
    for c in sorted(clients, key=lambda c: c.device_id):
        if c.device_id in exclude:
            excluded[c.device_id] = "already in this round"
            continue
        why = eligible(c, p)
        if why:
            excluded[c.device_id] = why
        else:
            pool.append(c)
    rng.shuffle(pool)
    chosen = sorted(pool[:p.clients], key=lambda c: c.device_id)
    for c in pool[p.clients:]:
        excluded[c.device_id] = "not drawn this round"
    sized = {c.device_id: size_task(c, p) for c in chosen}
    return Selection(tuple(c.device_id for c in chosen), {d: n for d, (n, _) in sized.items()}, excluded,
                     {d: why for d, (_, why) in sized.items() if why})


def why_waiting(sel: Selection, need: int, limit: int = 6) -> str:
    """One line for an operator: how many devices are eligible against the quorum, and why the
    others are not, grouped by reason (``busy (cpu > 90%) on 2: pi-1, pi-2; offline on 1: pi-3``)."""
    import re

    groups: dict[str, list[str]] = {}
    for dev, why in sorted(sel.excluded.items()):
        if why == "not drawn this round":
            continue
        key = re.sub(r"(cpu|silent for) [\d.]+%?s? ?", r"\1 ", why).replace("  ", " ")
        groups.setdefault(key, []).append(dev)
    parts = []
    for why, devs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(devs[:limit]) + (f" +{len(devs) - limit}" if len(devs) > limit else "")
        parts.append(f"{why} on {len(devs)}: {shown}")
    head = f"{len(sel.selected)} of {need} devices needed are eligible"
    return head + ("; " + "; ".join(parts) if parts else "; no device is known yet")
