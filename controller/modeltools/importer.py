"""``fleetctl model import``: a user's ONNX or TFLite export → a verified bundle, in one step.

ONNX: normalise (``normalize``), cut at a feature layer when asked (``split``: the dense layers
after it become ``head.npz``; a head for another label set is fitted on labelled data), quantize
the backbone on the calibration data and compare fp32 with int8 on the evaluation data
(``quantize``), keep int8 only when it is smaller, write reference/eval sets, and verify the
result the way the agent will (``protocol.verify`` over the runtime's IO) before the bundle is
moved into place. TFLite: the model is the backbone as given (int8 if it was converted so).
Nothing half-written is left at OUT: the bundle is built beside it and renamed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
import shutil
import tempfile
from typing import Any, Mapping, Sequence

import numpy as np

from protocol.atomicfile import replace_dir
from protocol.bundle import TASKS, head_bytes, head_forward, load_bundle, softmax, write_manifest
from protocol.verify import errors, io_of_runtime, verify

from .normalize import ModelError, io_specs, normalize, save
from .quantize import QuantizeError, compare, decide, float_ops, quantize_model, quiet_ort, run_rows, session
from .split import SplitError, auto_cut, cut_candidates, dense_head, extract_backbone


class ModelImportError(ValueError):
    """The model cannot become a bundle; the message says why and how to fix it."""


@dataclass
class ImportOptions:
    name: str
    version: str = "1.0.0"
    task: str = "classify"
    labels: list[str] | None = None
    input_shapes: dict[str, list[int | None]] | None = None
    cut: str | None = None                 # None: the whole model; "auto" or a tensor name
    calibration: str | None = None
    eval: str | None = None
    input_min: float | None = None
    input_max: float | None = None
    task_params: dict[str, Any] = field(default_factory=dict)
    max_drop: float = 0.02
    quantize: bool = True
    force: bool = False


@dataclass
class ImportReport:
    out: str
    runtime: str
    notes: list[str] = field(default_factory=list)
    candidates: list[dict[str, Any]] = field(default_factory=list)
    cut: str | None = None
    kept: str = "fp32"
    comparison: dict[str, Any] | None = None
    head: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# -- data ---------------------------------------------------------------------------------------------
def load_data(path: str | Path, inputs: Sequence[dict[str, Any]]) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """A data file → one feed per sample ({input name: [1, ...]}) and labels if it has them.

    ``.npy``: the samples of the (single) input, ``[n, ...]``. ``.npz``: ``x`` (or one array per
    input name) and optional ``y``."""
    p = Path(path)
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        else:
            d = {"x": np.load(p, allow_pickle=False)}
    except (OSError, ValueError) as exc:
        raise ModelImportError(f"{p.name}: cannot read ({exc})") from None
    names = [i["name"] for i in inputs]
    arrays: dict[str, np.ndarray] = {}
    if all(n in d for n in names):
        arrays = {n: d[n] for n in names}
    elif "x" in d and len(names) == 1:
        arrays = {names[0]: d["x"]}
    else:
        raise ModelImportError(f"{p.name}: needs an array 'x' (one input) or one array per input {names}; has {sorted(d)}")
    n = {len(a) for a in arrays.values()}
    if len(n) != 1 or not n.pop():
        raise ModelImportError(f"{p.name}: the arrays must have the same, non-zero number of samples")
    feeds: list[dict[str, np.ndarray]] = []
    for spec in inputs:
        a = arrays[spec["name"]]
        sample = [d for d in (spec["shape"] or [])[1:]]
        if any(s is None for s in sample):
            raise ModelImportError(f"input {spec['name']!r} has dynamic dimensions {spec['shape']}: give --input-shape")
        size = int(np.prod(sample)) if sample else 1
        if a[0].size != size:
            raise ModelImportError(f"{p.name}: a sample of {spec['name']!r} has {a[0].size} values ({list(a.shape[1:])}); "
                               f"the model takes {sample}")
        dt = np.dtype(spec["dtype"]) if spec["dtype"] in ("float32", "float16", "int8", "uint8", "int32", "int64") \
            else np.float32
        for i in range(len(a)):
            if len(feeds) <= i:
                feeds.append({})
            feeds[i][spec["name"]] = a[i].reshape([1] + sample).astype(dt)
    y = d.get("y")
    if y is not None and len(y) != len(feeds):
        raise ModelImportError(f"{p.name}: y has {len(y)} labels for {len(feeds)} samples")
    return feeds, None if y is None else np.asarray(y).astype(np.int64).reshape(-1)


def read_labels(path: str | Path) -> list[str]:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelImportError(f"--labels {path}: cannot read ({exc})") from None
    labels = [ln for ln in lines if ln]
    if not labels:
        raise ModelImportError(f"--labels {path}: no labels (one per line)")
    return labels


# -- the head -------------------------------------------------------------------------------------------
def fit_head(features: np.ndarray, y: np.ndarray, classes: int, steps: int = 400, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer softmax head fitted on labelled features (full-batch Adam, small L2): the initial
    head when the user's labels are not the exporter's classes."""
    rng = np.random.default_rng(seed)
    f = features.astype(np.float32)
    scale = float(np.sqrt((f ** 2).sum(1).mean())) or 1.0
    w = rng.normal(0, 0.01, (f.shape[1], classes)).astype(np.float32)
    b = np.zeros(classes, np.float32)
    onehot = np.eye(classes, dtype=np.float32)[y]
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    lr = 0.05 / scale * np.sqrt(f.shape[1])
    for t in range(1, steps + 1):
        p = softmax(f @ w + b)
        g = (p - onehot) / len(f)
        grads = [f.T @ g + 1e-4 * w, g.sum(0)]
        for i, (param, gr) in enumerate(zip((w, b), grads)):
            m[i] = 0.9 * m[i] + 0.1 * gr
            v[i] = 0.999 * v[i] + 0.001 * gr * gr
            param -= lr * (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.999 ** t)) + 1e-8)
    return {"dense0.weight": w, "dense0.bias": b}


# -- ONNX ---------------------------------------------------------------------------------------------
def _scores_first(model: Any, task: str) -> str | None:
    """For a whole classifier, put the float score output first (skl2onnx puts the int label first)."""
    g = model.graph
    if task != "classify" or len(g.output) < 2:
        return None
    floats = [o for o in g.output if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in (1, 10)]
    if not floats or floats[0].name == g.output[0].name:
        return None
    keep = [floats[0]] + [o for o in g.output if o.name != floats[0].name]
    copies = [type(o)() for o in keep]
    for c, o in zip(copies, keep):
        c.CopyFrom(o)
    del g.output[:]
    g.output.extend(copies)
    return copies[0].name


def _spec(d: dict[str, Any], lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    shape = list(d["shape"] or [])
    out = {"name": d["name"], "shape": [None] + shape[1:] if shape else shape, "dtype": d["dtype"]}
    if lo is not None:
        out["min"] = lo
    if hi is not None:
        out["max"] = hi
    return out


def import_onnx(src: str | Path, out: str | Path, opt: ImportOptions) -> ImportReport:
    src, out = Path(src), Path(out)
    rep = ImportReport(str(out), "onnxruntime")
    try:
        with quiet_ort():
            norm = normalize(src, opt.input_shapes)
    except ModelError as exc:
        raise ModelImportError(str(exc)) from None
    rep.notes += norm.notes
    model = norm.model
    moved = _scores_first(model, opt.task) if not opt.cut else None
    if moved:
        rep.notes.append(f"serving {moved!r} (the class scores) as the first output")
    ins, outs = io_specs(model)
    dyn = [(i["name"], i["shape"]) for i in ins if i["shape"] is None or any(d is None for d in i["shape"][1:])]
    if dyn and not opt.task_params.get("dynamic_dims"):
        raise ModelImportError(f"input {dyn[0][0]!r} has dynamic dimensions {dyn[0][1]}: give the sample shape with "
                           f"--input-shape (e.g. --input-shape 1,{','.join('H' if d is None else str(d) for d in (dyn[0][1] or [])[1:])})")
    tmp = _workdir(out)
    try:
        head = None
        if opt.cut:
            rep.candidates = [c.to_dict() for c in cut_candidates(model)]
            try:
                at = auto_cut(model).tensor if opt.cut == "auto" else opt.cut
                head = dense_head(model, at)
                backbone = extract_backbone(model, at, int(head["dense0.weight"].shape[0]))
            except SplitError as exc:
                raise ModelImportError(f"--cut {opt.cut}: {exc}") from None
            rep.cut = at
        else:
            backbone = model
        save(backbone, tmp / "fp32.onnx")
        bb_in, bb_out = io_specs(backbone)
        cal = load_data(opt.calibration, bb_in) if opt.calibration else None
        ev = load_data(opt.eval, bb_in) if opt.eval else None
        labels = list(opt.labels) if opt.labels else None
        labelled = ev if ev is not None and ev[1] is not None else (cal if cal is not None and cal[1] is not None else None)
        sess = session(tmp / "fp32.onnx")
        if head is not None:
            classes = int(head[f"dense{len(head) // 2 - 1}.bias"].shape[0])
            if labels is not None and len(labels) != classes:
                if labelled is None:
                    raise ModelImportError(f"--labels has {len(labels)} labels, the model's head {classes} classes: give "
                                       "labelled data (--calibration/--eval .npz with x and y) to fit a new head")
                feats, _ = run_rows(sess, labelled[0])
                head = fit_head(feats, labelled[1], len(labels))
                acc = float((head_forward(head, feats).argmax(1) == labelled[1]).mean())
                rep.head = {"fitted": True, "classes": len(labels), "train_accuracy": round(acc, 4),
                            "samples": len(feats)}
                rep.notes.append(f"fitted a new {len(labels)}-class head on {len(feats)} labelled samples "
                                 f"(accuracy {acc:.2%} on them)")
            else:
                rep.head = {"fitted": False, "classes": classes}
            labels = labels or [str(i) for i in range(int(head[f"dense{len(head) // 2 - 1}.bias"].shape[0]))]
        elif opt.task == "classify":
            probe = (ev or cal or (None, None))[0]
            n = None
            if probe:
                n = int(np.asarray(sess.run([bb_out[0]["name"]], probe[0])[0]).size)
            elif bb_out[0]["shape"] and all(d is not None for d in bb_out[0]["shape"][1:]):
                n = int(np.prod(bb_out[0]["shape"][1:]))
            if labels is not None and n is not None and len(labels) != n:
                raise ModelImportError(f"--labels has {len(labels)} labels; the model's {bb_out[0]['name']!r} gives {n} "
                                   "values per sample (cut it with --cut to train a new head)")
            labels = labels or ([str(i) for i in range(n)] if n else [])
        chosen = tmp / "fp32.onnx"
        qfeeds = cal[0] if cal is not None else (ev[0] if ev is not None else None)
        if opt.quantize and qfeeds is None:
            rep.notes.append("no --calibration data: the backbone stays fp32")
        elif opt.quantize:
            try:
                fmt = quantize_model(tmp / "fp32.onnx", tmp / "int8.onnx", qfeeds[:64])
                left = float_ops(backbone)
                if left:
                    rep.notes.append("left in float (no int8 form): " + ", ".join(f"{k} {v}" for k, v in left.items()))
                cfeeds, cy = (ev if ev is not None else cal)
                cmp = compare(tmp / "fp32.onnx", tmp / "int8.onnx", cfeeds, cy, head=head)
                rep.comparison = {**cmp.to_dict(), "format": fmt}
                keep, notes = decide(cmp, opt.max_drop)
                rep.warnings += [n for n in notes if n.startswith("WARNING")]
                rep.notes += [n for n in notes if not n.startswith("WARNING")]
                if keep:
                    chosen, rep.kept = tmp / "int8.onnx", "int8"
            except QuantizeError as exc:
                rep.notes.append(f"not quantized: {exc}")
        return _finish(tmp, out, chosen, ".onnx", opt, rep, head, labels, ins if not opt.cut else bb_in,
                       bb_out, ev, cal)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reference(feeds: list[dict[str, np.ndarray]], head: Mapping[str, np.ndarray] | None, runtime: Any) -> np.ndarray:
    """What the agent's engine computes for these inputs (softmax over the head, or the scores)."""
    outs = []
    for f in feeds:
        y = np.asarray(runtime(f), np.float32).reshape(1, -1)
        if head is not None:
            outs.append(softmax(head_forward(head, y))[0])
        else:
            flat = y[0]
            outs.append(flat if flat.min() >= 0 and abs(float(flat.sum()) - 1.0) < 1e-3 else softmax(flat))
    return np.stack(outs)


def _finish(tmp: Path, out: Path, chosen: Path, suffix: str, opt: ImportOptions, rep: ImportReport,
            head: Mapping[str, np.ndarray] | None, labels: list[str] | None, ins: list[dict[str, Any]],
            outs: list[dict[str, Any]], ev: Any, cal: Any) -> ImportReport:
    bdir = tmp / "bundle"
    bdir.mkdir()
    bb = f"backbone{suffix}"
    shutil.copy(chosen, bdir / bb)
    files: dict[str, Any] = {bb: {"role": "backbone"}}
    if head is not None:
        (bdir / "head.npz").write_bytes(head_bytes(head))
        files["head.npz"] = {"role": "head"}
    specs = [_spec(i, opt.input_min, opt.input_max) for i in ins]
    man: dict[str, Any] = {"name": opt.name, "version": opt.version, "input": specs[0], "inputs": specs,
                           "labels": labels or [], "files": files, "task": opt.task,
                           "metrics": {"import": {"source": Path(rep.out).name, "kept": rep.kept, "cut": rep.cut,
                                                  **({"comparison": rep.comparison} if rep.comparison else {})}}}
    if opt.task_params:
        man["task_params"] = dict(opt.task_params)
    if head is not None:
        man["features"] = {"name": rep.cut, "shape": [None, int(head["dense0.weight"].shape[0])]}
    elif opt.task != "classify":
        man["outputs"] = [_spec(o) for o in outs if o["dtype"] in
                          ("float32", "float16", "int8", "uint8", "int32", "int64")]
    run = _runner(bdir / bb)
    ref_src = ev if ev is not None else cal
    if opt.task == "classify" and ref_src is not None:
        feeds = ref_src[0][:8]
        probs = _reference(feeds, head, run)
        x = np.stack([next(iter(f.values()))[0] for f in feeds])
        np.savez(bdir / "reference.npz", x=x, probs=probs)
        files["reference.npz"] = {"role": "reference"}
        man["reference"] = {"file": "reference.npz", "min_agreement": 1.0, "max_prob_diff": 0.05}
        if ev is not None and ev[1] is not None and len(ins) == 1:
            pe = _reference(ev[0], head, run)
            acc = float((pe.argmax(1) == ev[1]).mean())
            np.savez(bdir / "eval.npz", x=np.stack([next(iter(f.values()))[0] for f in ev[0]]), y=ev[1])
            files["eval.npz"] = {"role": "eval"}
            man["eval"] = {"file": "eval.npz", "baseline_accuracy": round(acc, 5), "max_accuracy_drop": opt.max_drop}
            man["metrics"]["accuracy"] = round(acc, 5)
    write_manifest(bdir, man)
    problems = deep_verify(bdir)
    bad = errors(problems)
    if bad:
        raise ModelImportError("the bundle does not verify: " + "; ".join(str(p) for p in bad))
    rep.warnings += [str(p) for p in problems if p.severity != "error"]
    _place(bdir, out, opt.force)
    return rep


def _runner(path: Path):
    if path.suffix == ".tflite":
        from .litert import LiteRtModel

        m = LiteRtModel(path)
        return lambda feed: m.run(feed)[0]
    s = session(path)
    name = s.get_outputs()[0].name
    return lambda feed: s.run([name], feed)[0]


def _workdir(out: Path) -> Path:
    """A private folder beside OUT (same file system: the finished bundle is renamed into place)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    except OSError as exc:
        raise ModelImportError(f"cannot write beside {out}: {exc}") from None


def _place(bdir: Path, out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ModelImportError(f"{out} exists (use --force to replace it)")
    replace_dir(bdir, out)


def deep_verify(bundle_dir: str | Path) -> list:
    """Load a bundle (hashes, head) and verify its manifest against the model as its runtime reads it."""
    b = load_bundle(bundle_dir)
    path = b.backbone_path
    if path.suffix == ".tflite":
        from .litert import LiteRtModel

        rt: Any = LiteRtModel(path).interp
    else:
        rt = session(path)
    ins, outs = io_of_runtime(rt)
    return verify(b.manifest, ins, outs, b.head)


# -- TFLite -------------------------------------------------------------------------------------------
def import_tflite(src: str | Path, out: str | Path, opt: ImportOptions) -> ImportReport:
    from .litert import LiteRtModel

    src, out = Path(src), Path(out)
    rep = ImportReport(str(out), "litert", kept="as given")
    if opt.cut:
        raise ModelImportError("--cut works on ONNX graphs; a .tflite model is imported whole (no head)")
    try:
        m = LiteRtModel(src)
    except ValueError as exc:
        raise ModelImportError(str(exc)) from None
    ins, outs = m.io()
    rep.notes.append("LiteRT model taken as given (no re-quantization): "
                     + ", ".join(f"{i['name']} {i['dtype']}{' (quantized)' if i.get('quantized') else ''}" for i in ins))
    tmp = _workdir(out)
    try:
        feed_specs = [{**i, "dtype": "float32" if i.get("quantized") else i["dtype"]} for i in ins]
        ev = load_data(opt.eval, feed_specs) if opt.eval else None
        cal = load_data(opt.calibration, feed_specs) if opt.calibration else None
        labels = list(opt.labels) if opt.labels else None
        if opt.task == "classify":
            n = int(np.prod(outs[0]["shape"][1:])) if outs[0]["shape"] else None
            if labels is not None and n is not None and len(labels) != n:
                raise ModelImportError(f"--labels has {len(labels)} labels; the model's {outs[0]['name']!r} gives {n} "
                                   "values per sample")
            labels = labels or ([str(i) for i in range(n)] if n else [])
        shutil.copy(src, tmp / "model.tflite")
        ins_spec = [{**i, "dtype": "float32" if i.get("quantized") else i["dtype"]} for i in ins]
        return _finish(tmp, out, tmp / "model.tflite", ".tflite", opt, rep, None, labels, ins_spec, outs, ev, cal)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_model(src: str | Path, out: str | Path, opt: ImportOptions) -> ImportReport:
    if opt.task not in TASKS:
        raise ModelImportError(f"--task {opt.task!r}: not one of {', '.join(TASKS)}")
    suffix = Path(src).suffix.lower()
    if suffix == ".onnx":
        return import_onnx(src, out, opt)
    if suffix == ".tflite":
        return import_tflite(src, out, opt)
    raise ModelImportError(f"{Path(src).name}: not a .onnx or .tflite file")

