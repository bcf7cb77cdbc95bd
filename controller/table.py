"""Plain-text tables and ages for human CLI output (``--json`` is the stable form)."""
from __future__ import annotations

import time
from typing import Any, Sequence


def age(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "-"
    d = max(0.0, (now or time.time()) - ts)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return f"{d / 86400:.1f}d ago"


def fmt(v: Any, digits: int = 3) -> str:
    """A cell: floats to ``digits`` significant digits (0.99 stays 0.99, 0.0029 stays 0.0029, never
    "1.0" or "0.0"), whole numbers of 10**digits and more without a fraction; None as "-"."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 10 ** digits:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    if isinstance(v, (dict, list, tuple)):
        return compact(v)
    return str(v)


def compact(v: Any) -> str:
    """A nested value for a human: ``k=v`` pairs and comma lists, not a Python repr."""
    if isinstance(v, dict):
        return " ".join(f"{k}={compact(x)}" for k, x in v.items()) or "-"
    if isinstance(v, (list, tuple)):
        return ",".join(compact(x) for x in v) or "-"
    return fmt(v)


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
