"""Health and quality gate for a staged bundle, before it may serve.

1. it loads (every hash, the manifest, the runtime session);
2. its reference inputs give the reference outputs (label agreement, max probability
   difference, both bounds from the manifest);
3. its labelled evaluation set scores at least the manifest's baseline minus the allowed
   drop, and — when a current engine is given — no worse than the model it replaces
   (shadow evaluation on the same set), with p95 latency within ``max_latency_ratio``.

Raises ``Unhealthy`` with the reason; returns the figures when healthy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from protocol.bundle import BundleError, load_bundle

from .inference import InferenceEngine, InputError


class Unhealthy(Exception):
    pass


def _eval(engine: InferenceEngine, x: np.ndarray, y: np.ndarray) -> tuple[float, float, np.ndarray]:
    preds, lat = [], []
    for xi in x:
        p = engine.predict(xi)
        preds.append(p.label)
        lat.append(p.latency_ms)
    preds_a = np.asarray(preds)
    return float((preds_a == y).mean()), float(np.percentile(lat, 95)), preds_a


def check_bundle(path: str | Path, threads: int = 1, current: InferenceEngine | None = None,
                 max_latency_ratio: float = 3.0) -> dict[str, Any]:
    try:
        bundle = load_bundle(path)
        engine = InferenceEngine(bundle, threads=threads)
    except (BundleError, ValueError, RuntimeError) as exc:
        raise Unhealthy(f"does not load: {exc}") from None
    m = bundle.manifest
    out: dict[str, Any] = {"version": m.version}
    try:
        ref = bundle.npz("reference")
        if ref is not None:
            x, want = ref["x"], ref["probs"]
            got = np.stack([engine.predict(xi).probabilities for xi in x])
            agree = float((got.argmax(1) == want.argmax(1)).mean())
            diff = float(np.abs(got - want).max())
            rc = m.reference or {}
            out.update(reference_agreement=agree, reference_max_prob_diff=round(diff, 6))
            if agree < float(rc.get("min_agreement", 1.0)):
                raise Unhealthy(f"reference agreement {agree:.2%} < {float(rc.get('min_agreement', 1.0)):.2%}")
            if diff > float(rc.get("max_prob_diff", 0.05)):
                raise Unhealthy(f"reference outputs differ by {diff:.3f} > {float(rc.get('max_prob_diff', 0.05))}")
        ev = bundle.npz("eval")
        if ev is not None:
            acc, p95, preds = _eval(engine, ev["x"], ev["y"])
            ec = m.eval or {}
            floor = float(ec.get("baseline_accuracy", 0.0)) - float(ec.get("max_accuracy_drop", 0.02))
            out.update(eval_accuracy=round(acc, 5), eval_p95_ms=round(p95, 4))
            if acc < floor:
                raise Unhealthy(f"evaluation accuracy {acc:.2%} < required {floor:.2%}")
            if current is not None:
                try:
                    cur_acc, cur_p95, cur_preds = _eval(current, ev["x"], ev["y"])
                except InputError as exc:
                    cur_acc, cur_p95, cur_preds = 0.0, float("inf"), None
                    out["shadow_note"] = f"current model cannot run this eval set: {exc}"
                out.update(current_accuracy=round(cur_acc, 5), current_p95_ms=round(cur_p95, 4))
                if cur_preds is not None:
                    out["agreement_with_current"] = round(float((cur_preds == preds).mean()), 5)
                drop = float(ec.get("max_accuracy_drop", 0.02))
                if acc < cur_acc - drop:
                    raise Unhealthy(f"shadow evaluation: {acc:.2%} vs the serving model's {cur_acc:.2%}")
                if np.isfinite(cur_p95) and p95 > max(cur_p95 * max_latency_ratio, cur_p95 + 1.0):
                    raise Unhealthy(f"p95 latency {p95:.2f} ms vs the serving model's {cur_p95:.2f} ms")
    except InputError as exc:
        raise Unhealthy(f"reference/eval inputs rejected: {exc}") from None
    return out
