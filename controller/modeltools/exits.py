"""Early exits for a bundle: cut the backbone at the exit tensors, train one small head per exit.

``add_exits(bundle, tensors, data, out)`` (``fleetctl model exits`` / ``split --exit`` /
``import --exit``) writes a new bundle with ``segment{i}.onnx`` (the backbone cut at the exit
tensors with ``onnx.utils.extract_model``) and ``exit{i}.npz`` heads.

The heads are **distilled**: trained on the bundle's own data (``data.npz``, else its calibration
or eval set; labels are not needed) to match the full model's probabilities (soft-target
cross-entropy), so an exit learns to say what the full model would say. Each exit's threshold is
the lowest confidence at which its answers agree with the full model on ``agreement`` of a
held-out quarter of the data; the manifest records per exit the fraction of the backbone's
multiply-accumulates done by then (``compute``), and the eval set's exit rates, accuracy and
compute saved go into ``metrics.exits``.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from protocol.atomicfile import replace_dir
from protocol.bundle import Bundle, head_bytes, head_forward, load_bundle, softmax, write_manifest
from protocol.exits import exit_features


class ExitError(ValueError):
    """Exits we cannot add; the message names the tensor or file."""


# -- graph -------------------------------------------------------------------------------------
def _shapes(model: Any) -> dict[str, list[int | None]]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    out: dict[str, list[int | None]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return out


def macs(model: Any) -> int:
    """Multiply-accumulates of one sample through a graph (Conv, Gemm, MatMul; the rest is noise)."""
    from onnx import numpy_helper

    shapes = _shapes(model)
    inits = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    total = 0
    for n in model.graph.node:
        if n.op_type == "Conv":
            out = shapes.get(n.output[0])
            w = inits.get(n.input[1]) or shapes.get(n.input[1])
            if out and w and all(d for d in out[1:]):
                total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
        elif n.op_type in ("Gemm", "MatMul"):
            a, out = shapes.get(n.input[0]), shapes.get(n.output[0])
            if a and out and a[-1] and out[-1]:
                total += int(a[-1]) * int(out[-1])
    return total


def cut_segments(backbone: Path, input_names: Sequence[str], tensors: Sequence[str], final: str,
                 out_dir: Path) -> tuple[list[str], list[int]]:
    """segment{i}.onnx files in ``out_dir`` and each one's MACs."""
    import onnx
    from onnx.utils import extract_model

    model = onnx.load(str(backbone))
    shapes = _shapes(model)
    produced = {o for n in model.graph.node for o in n.output}
    for t in tensors:
        if t == final or t in input_names:
            raise ExitError(f"exit tensor {t!r} is the backbone's {'output' if t == final else 'input'}: "
                            "an exit sits inside the backbone")
        if t not in produced:
            raise ExitError(f"exit tensor {t!r} is not produced by any node of {backbone.name}")
        s = shapes.get(t)
        if not s or len(s) not in (2, 4) or any(d is None for d in s[1:]):
            raise ExitError(f"exit tensor {t!r} has shape {s}: an exit needs a static [N,C] or [N,C,H,W] tensor")
    bounds = [list(input_names)] + [[t] for t in tensors]
    ends = [[t] for t in tensors] + [[final]]
    files, costs = [], []
    for i, (ins, outs) in enumerate(zip(bounds, ends)):
        name = f"segment{i}.onnx"
        try:
            extract_model(str(backbone), str(out_dir / name), ins, outs)
        except Exception as exc:  # noqa: BLE001 - onnx raises bare Exceptions and ValidationErrors
            raise ExitError(f"cannot cut {backbone.name} between {ins} and {outs}: {exc}") from None
        files.append(name)
        costs.append(macs(onnx.load(str(out_dir / name))))
    return files, costs


# -- running segments (controller side, ONNX Runtime) --------------------------------------------
def _session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_chain(paths: Sequence[Path], x: np.ndarray, batch: int = 256) -> list[np.ndarray]:
    """Every segment's output for inputs x (the exit tensors, then the backbone's output)."""
    sess = [_session(p) for p in paths]
    outs: list[list[np.ndarray]] = [[] for _ in sess]
    for i in range(0, len(x), batch):
        h = x[i:i + batch]
        for k, s in enumerate(sess):
            h = s.run(None, {s.get_inputs()[0].name: h})[0]
            outs[k].append(h)
    return [np.concatenate(o) for o in outs]


# -- heads ---------------------------------------------------------------------------------------
def train_distilled(f: np.ndarray, teacher: np.ndarray, epochs: int = 150, lr: float = 0.02,
                    seed: int = 0, hidden: int = 0) -> dict[str, np.ndarray]:
    """A dense head (``head.npz`` format) on features f trained full-batch with Adam to match the
    teacher's probabilities (soft-target cross-entropy); ``hidden`` > 0 adds a ReLU layer."""
    rng = np.random.default_rng(seed)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sd
    sizes = [f.shape[1]] + ([hidden] if hidden else []) + [teacher.shape[1]]
    ws = [(rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32) for a, b in zip(sizes, sizes[1:])]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    params = ws + bs
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    n = len(z)
    for t in range(1, epochs + 1):
        acts = [z]
        for i, (w, b) in enumerate(zip(ws, bs)):
            h = acts[-1] @ w + b
            acts.append(np.maximum(h, 0) if i < len(ws) - 1 else h)
        d = (softmax(acts[-1]) - teacher) / n
        gw, gb = [], []
        for i in range(len(ws) - 1, -1, -1):
            gw.insert(0, acts[i].T @ d)
            gb.insert(0, d.sum(0))
            if i:
                d = (d @ ws[i].T) * (acts[i] > 0)
        grads = gw + gb
        for k, (p, g) in enumerate(zip(params, grads)):
            g = g + 1e-4 * p if k < len(ws) else g
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            p -= lr * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-8)
    # fold the standardisation into the first layer: the agent feeds raw pooled features
    w0 = ws[0] / sd[:, None]
    b0 = bs[0] - (mu / sd) @ ws[0]
    head = {"dense0.weight": w0.astype(np.float32), "dense0.bias": b0.astype(np.float32)}
    for i in range(1, len(ws)):
        head[f"dense{i}.weight"], head[f"dense{i}.bias"] = ws[i].astype(np.float32), bs[i].astype(np.float32)
    return head


def pick_thresholds(exit_probs: Sequence[np.ndarray], teacher_label: np.ndarray, compute: Sequence[float],
                    agreement: float, grid: Sequence[float] | None = None,
                    head_compute: Sequence[float] | None = None) -> list[float]:
    """Per-exit thresholds that save the most compute while the answers (first confident exit,
    else the full model) still agree with the full model on ``agreement`` of the samples (pure;
    an exhaustive search over a grid; 1.0 = the exit never answers)."""
    import itertools

    g = list(grid) if grid is not None else [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99,
                                            0.995, 0.999, 1.0]
    conf = [p.max(1) for p in exit_probs]
    lab = [p.argmax(1) for p in exit_probs]
    agree = [lb == teacher_label for lb in lab]
    n = len(teacher_label)
    hc = np.cumsum(list(head_compute) if head_compute is not None else [0.0] * len(exit_probs))
    best, best_saved = [1.0] * len(exit_probs), 0.0
    for combo in itertools.product(g, repeat=len(exit_probs)):
        left = np.ones(n, bool)
        ok = np.zeros(n, bool)
        spent = np.zeros(n)
        for k, t in enumerate(combo):
            hit = left & (conf[k] >= t) if t < 1.0 else np.zeros(n, bool)
            ok |= hit & agree[k]
            spent[hit] = compute[k] + hc[k]
            left &= ~hit
        ok |= left
        spent[left] = 1.0 + hc[-1]
        saved = 1.0 - float(spent.mean())
        if ok.mean() >= agreement and saved > best_saved:
            best, best_saved = list(combo), saved
    return [float(t) for t in best]


def simulate(exit_probs: Sequence[np.ndarray], final_probs: np.ndarray, thresholds: Sequence[float],
             compute: Sequence[float], head_compute: Sequence[float] | None = None) -> dict[str, Any]:
    """Which exit answers each sample (first confident one, else the full model), and the
    fraction of backbone compute not run (pure)."""
    n = len(final_probs)
    taken = np.full(n, len(exit_probs))
    label = final_probs.argmax(1).copy()
    for k in range(len(exit_probs) - 1, -1, -1):
        hit = exit_probs[k].max(1) >= thresholds[k] if thresholds[k] < 1.0 else np.zeros(n, bool)
        taken[hit] = k
        label[hit] = exit_probs[k][hit].argmax(1)
    hc = np.cumsum(list(head_compute) if head_compute is not None else [0.0] * len(exit_probs))
    spent = (np.array(list(compute) + [1.0]) + np.concatenate([hc, hc[-1:] if len(hc) else [0.0]]))[taken]
    return {"exit": taken, "label": label, "compute_saved": float(1.0 - spent.mean()),
            "rates": [float((taken == k).mean()) for k in range(len(exit_probs) + 1)]}


def _bundle_data(b: Bundle, data: str | Path | None) -> np.ndarray:
    if data is not None:
        p = Path(data)
        if p.suffix == ".npy":
            return np.load(p, allow_pickle=False)
        with np.load(p, allow_pickle=False) as z:
            if "x" not in z.files:
                raise ExitError(f"{p.name}: no array 'x'")
            return z["x"]
    ev = b.npz("eval")
    if ev is None:
        raise ExitError("no data to train exit heads on: pass --data (x [n, ...]) or add an eval set")
    return ev["x"]


def add_exits(bundle_dir: str | Path, tensors: Sequence[str], out: str | Path, data: str | Path | None = None,
              agreement: float = 0.992, pool: int = 4, thresholds: Sequence[float] | None = None,
              hidden: int = 64) -> dict[str, Any]:
    """A copy of the bundle at ``out`` with early exits at ``tensors`` (in model order)."""
    src = load_bundle(bundle_dir)
    m = src.manifest
    if src.backbone_path.suffix != ".onnx":
        raise ExitError("early exits need an ONNX backbone (a LiteRT bundle is served whole)")
    if m.task != "classify":
        raise ExitError(f"early exits answer a classification; this bundle's task is {m.task!r}")
    if m.exits:
        raise ExitError("the bundle already has exits: add them to the original bundle")
    if not tensors:
        raise ExitError("name at least one exit tensor (--exit)")
    x = _bundle_data(src, data)
    import onnx

    bb = onnx.load(str(src.backbone_path))
    in_names = [i.name for i in bb.graph.input if i.name not in {t.name for t in bb.graph.initializer}]
    final = bb.graph.output[0].name
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src.path, tmp)
    try:
        files, costs = cut_segments(src.backbone_path, in_names, tensors, final, tmp)
        total = max(1, sum(costs))
        compute = [float(np.cumsum(costs)[k] / total) for k in range(len(tensors))]
        outs = run_chain([tmp / f for f in files], x)
        feats = outs[-1]
        full = softmax(head_forward(src.head, feats)) if src.head is not None else softmax(feats.reshape(len(x), -1))
        rng = np.random.default_rng(0)
        idx = rng.permutation(len(x))
        tr, va = idx[: len(x) * 3 // 4], idx[len(x) * 3 // 4:]
        heads, probs_va = [], []
        for k, t in enumerate(tensors):
            if outs[k].ndim == 4 and (outs[k].shape[2] % pool or outs[k].shape[3] % pool):
                raise ExitError(f"exit tensor {t!r} {list(outs[k].shape[1:])} is not divisible by pool {pool}")
            f = exit_features(outs[k], pool if outs[k].ndim == 4 else 1)
            h = train_distilled(f[tr], full[tr], hidden=hidden)
            heads.append(h)
            pv = softmax(head_forward(h, f[va]))
            probs_va.append(pv)
        total_h = max(1, sum(costs))
        head_c = [sum(int(np.prod(v.shape)) for n, v in h.items() if n.endswith(".weight")) / total_h for h in heads]
        thr = [float(t) for t in thresholds] if thresholds else \
            pick_thresholds(probs_va, full[va].argmax(1), compute, agreement, head_compute=head_c)
        for k, h in enumerate(heads):
            (tmp / f"exit{k}.npz").write_bytes(head_bytes(h))
        man = json.loads((tmp / "manifest.json").read_text())
        for f_ in files:
            man["files"][f_] = {"role": "segment"}
        for k in range(len(tensors)):
            man["files"][f"exit{k}.npz"] = {"role": "exit_head"}
        man["exits"] = [{"tensor": t, "head": f"exit{k}.npz", "threshold": round(thr[k], 6), "order": k,
                         "pool": pool if outs[k].ndim == 4 else 1, "compute": round(compute[k], 6),
                         "head_compute": round(head_c[k], 6)}
                        for k, t in enumerate(tensors)]
        man["segments"] = files
        sim = simulate(probs_va, full[va], thr, compute, head_c)
        report: dict[str, Any] = {"tensors": list(tensors), "thresholds": [round(t, 4) for t in thr],
                                  "compute": [round(c, 4) for c in compute], "trained_on": int(len(tr)),
                                  "training": "distilled (soft targets of the full model)",
                                  "heldout_agreement": round(float((sim["label"] == full[va].argmax(1)).mean()), 4),
                                  "heldout_compute_saved": round(sim["compute_saved"], 4),
                                  "heldout_exit_rates": [round(r, 4) for r in sim["rates"]]}
        ev = src.npz("eval")
        if ev is not None and "y" in ev:
            eo = run_chain([tmp / f for f in files], ev["x"])
            ef = softmax(head_forward(src.head, eo[-1])) if src.head is not None else softmax(eo[-1])
            ep = [softmax(head_forward(h, exit_features(eo[k], pool if eo[k].ndim == 4 else 1)))
                  for k, h in enumerate(heads)]
            es = simulate(ep, ef, thr, compute, head_c)
            report.update(eval_accuracy_full=round(float((ef.argmax(1) == ev["y"]).mean()), 4),
                          eval_accuracy_exits=round(float((es["label"] == ev["y"]).mean()), 4),
                          eval_compute_saved=round(es["compute_saved"], 4),
                          eval_exit_rates=[round(r, 4) for r in es["rates"]])
        man.setdefault("metrics", {})["exits"] = report
        write_manifest(tmp, man)
        load_bundle(tmp)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report

