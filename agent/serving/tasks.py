"""What a model's outputs mean, per task: plain numpy in, a JSON-ready answer out (no I/O).

The manifest's ``task`` picks one (``protocol.bundle.TASKS``):

* ``classify`` — class probabilities (softmax of logits unless they already are probabilities):
  the top ``task_params.top_k`` (default 5) with label names; label/confidence/entropy stay at the
  top level because the offload policy and on-device learning use them.
* ``regress``  — ``values``: the (first) served output, flattened.
* ``detect``   — ``detections``: box, score, class (and label name) for every score at or above
  ``task_params.threshold`` (default 0.5), best first, at most ``max_detections`` (default 100).
  ``task_params`` names the ``boxes``, ``scores`` and optional ``classes`` outputs; scores of shape
  [N, C] (one per class) take each row's best class.
* ``embed``    — ``embedding``: the vector, and its ``dim``.
* ``raw``      — ``outputs``: every served output by name, with its shape and dtype.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

DEFAULT_TOP_K = 5
DEFAULT_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS = 100


class TaskError(ValueError):
    """The outputs do not fit the task's declaration (a bundle problem, reported as ``internal``)."""


def probabilities(out: np.ndarray) -> np.ndarray:
    """Class probabilities from a model's scores: kept when they already sum to 1, else softmax."""
    flat = np.asarray(out).reshape(-1).astype(np.float32, copy=False)
    s = float(flat.sum())
    if flat.size and flat.min() >= 0 and abs(s - 1.0) < 1e-3:
        return flat
    e = np.exp(flat - flat.max())
    return e / e.sum()


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict[str, Any]]:
    k = max(1, min(int(k), probs.size))
    idx = np.argpartition(-probs, k - 1)[:k] if k < probs.size else np.arange(probs.size)
    idx = idx[np.argsort(-probs[idx], kind="stable")]
    return [{"label": int(i), "label_name": labels[i] if i < len(labels) else None,
             "p": round(float(probs[i]), 6)} for i in idx]


def _rows(a: np.ndarray, width: int | None = None) -> np.ndarray:
    """Drop a leading batch dimension of 1: [1, N, ...] → [N, ...]."""
    a = np.asarray(a)
    while a.ndim > (2 if width else 1) and a.shape[0] == 1:
        a = a[0]
    return a


def detections(outputs: Mapping[str, np.ndarray], params: Mapping[str, Any],
               labels: Sequence[str]) -> dict[str, Any]:
    names = list(outputs)
    boxes_name = params.get("boxes") or (names[0] if names else None)
    scores_name = params.get("scores") or (names[1] if len(names) > 1 else None)
    if boxes_name not in outputs or scores_name not in outputs:
        raise TaskError(f"detect: outputs {names} lack boxes {boxes_name!r} / scores {scores_name!r} "
                        "(task_params.boxes / task_params.scores)")
    boxes = _rows(outputs[boxes_name], 4).astype(np.float32, copy=False)
    scores = _rows(outputs[scores_name]).astype(np.float32, copy=False)
    if boxes.ndim != 2 or boxes.shape[-1] < 4:
        raise TaskError(f"detect: boxes {boxes_name!r} has shape {list(np.shape(outputs[boxes_name]))}; "
                        "expected [N, 4] (batch of 1 allowed)")
    classes: np.ndarray | None = None
    if scores.ndim == 2:                        # [N, C]: per-class scores
        classes = scores.argmax(axis=1)
        scores = scores.max(axis=1)
    cname = params.get("classes")
    if cname:
        if cname not in outputs:
            raise TaskError(f"detect: no output {cname!r} (task_params.classes)")
        classes = _rows(outputs[cname]).reshape(-1)
    n = min(boxes.shape[0], scores.shape[0])
    thr = float(params.get("threshold", DEFAULT_THRESHOLD))
    keep = np.nonzero(scores[:n] >= thr)[0]
    keep = keep[np.argsort(-scores[keep], kind="stable")][:int(params.get("max_detections", DEFAULT_MAX_DETECTIONS))]
    dets = []
    for i in keep:
        d: dict[str, Any] = {"box": [round(float(v), 6) for v in boxes[i, :4]], "score": round(float(scores[i]), 6)}
        if classes is not None and i < classes.size:
            c = int(classes[i])
            d["class"] = c
            d["label_name"] = labels[c] if 0 <= c < len(labels) else None
        dets.append(d)
    return {"detections": dets, "count": len(dets), "threshold": thr}


def raw(outputs: Mapping[str, np.ndarray]) -> dict[str, Any]:
    return {"outputs": {k: {"shape": list(np.shape(v)), "dtype": np.asarray(v).dtype.name,
                            "data": _finite(np.asarray(v)).tolist()} for k, v in outputs.items()}}


def _finite(a: np.ndarray) -> np.ndarray:
    """JSON has no NaN/inf: they become null-free numbers (clipped), never a failed reply."""
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return np.nan_to_num(a, nan=0.0, posinf=np.finfo(a.dtype).max, neginf=np.finfo(a.dtype).min)
    return a


def shape_answer(task: str, outputs: Mapping[str, np.ndarray], params: Mapping[str, Any],
                 labels: Sequence[str]) -> dict[str, Any]:
    """The answer for a non-classify task (classify goes through ``InferenceEngine.predict``)."""
    first = next(iter(outputs.values()))
    if task == "regress":
        out: dict[str, Any] = {"values": _finite(np.asarray(first, dtype=np.float32).reshape(-1)).tolist()}
        if len(outputs) > 1:
            out.update(raw(outputs))
        return out
    if task == "embed":
        v = _finite(np.asarray(first, dtype=np.float32).reshape(-1))
        return {"embedding": [round(float(x), 7) for x in v], "dim": int(v.size)}
    if task == "detect":
        return detections(outputs, params, labels)
    if task == "raw":
        return raw(outputs)
    raise TaskError(f"unknown task {task!r}")
