"""Model bundles: a manifest plus a frozen backbone and an optional trainable head.

Directory layout::

    manifest.json   name, version, parent_version, input/feature/output spec, labels,
                    files {relpath: {sha256, size, role}}, optional reference and eval sets
    backbone.onnx   (or .tflite) frozen, usually int8: input → features (or → logits if no head)
    head.npz        float32 dense{i}.weight [in, out] / dense{i}.bias [out], ReLU between
    reference.npz   optional: inputs + expected probabilities (health check)
    eval.npz        optional: a small labelled set (quality gate)

``parse_manifest`` is pure; ``load_bundle`` hashes the files and refuses a bundle with
a reason (``BundleError``) naming the file or field.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .atomicfile import write_atomic
from .exits import BottleneckSpec, ExitsError, ExitSpec, parse_exits

MANIFEST = "manifest.json"
# "mcu": a model (or any blob) for the board's sensor MCU, pushed over the firmware bridge when
# the version that carries it is applied (agent/updates/feature.py); the MCU's answer decides the update
ROLES = ("backbone", "head", "reference", "eval", "labels", "other", "mcu",
         # early exits and the learned bottleneck (protocol/exits.py): the backbone cut into
         # segments at the exit tensors, one small head per exit, the board's encoder and the
         # worker's decoder at the split
         "segment", "exit_head", "encoder", "decoder")
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64")
# what a bundle's outputs mean, and so how the agent shapes its answer (agent/serving):
# classify: top-k with label names; regress: values; detect: boxes, scores, classes above a
# threshold (``task_params`` names the outputs); embed: the vector; raw: every named output
TASKS = ("classify", "regress", "detect", "embed", "raw")
MAX_MANIFEST_BYTES = 1024 * 1024


class BundleError(ValueError):
    """A bundle we will not serve; the message names the file or field."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"
    min: float | None = None
    max: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        if self.min is not None:
            d["min"] = self.min
        if self.max is not None:
            d["max"] = self.max
        return d


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int
    role: str


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    input: TensorSpec
    features: TensorSpec | None
    labels: tuple[str, ...]
    files: Mapping[str, FileEntry]
    parent_version: str | None = None
    created: float | None = None
    metrics: Mapping[str, Any] = field(default_factory=dict)
    reference: Mapping[str, Any] | None = None
    eval: Mapping[str, Any] | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)
    # every model input in feed order; ``input`` is ``inputs[0]`` (single-input bundles and old
    # manifests write only ``input``)
    inputs: tuple[TensorSpec, ...] = ()
    # the model outputs the bundle serves, by name; () = the backbone's first output
    outputs: tuple[TensorSpec, ...] = ()
    task: str = "classify"
    # task-specific settings, e.g. detect: {"boxes": NAME, "scores": NAME, "classes": NAME,
    # "threshold": 0.5}; classify: {"top_k": 5}
    task_params: Mapping[str, Any] = field(default_factory=dict)
    # early exits in order, the segment files (len(exits) + 1) and the bottleneck at one exit's
    # tensor (protocol/exits.py); () / None for a bundle without them
    exits: tuple[ExitSpec, ...] = ()
    segments: tuple[str, ...] = ()
    bottleneck: BottleneckSpec | None = None

    def file(self, role: str) -> str | None:
        for name, e in self.files.items():
            if e.role == role:
                return name
        return None


def _err(field_: str, msg: str) -> BundleError:
    return BundleError(f"manifest {field_}: {msg}")


def _spec(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise _err(where, "must be an object")
    name = d.get("name", where)
    shape = d.get("shape")
    if not isinstance(shape, list) or not shape or len(shape) > 8 or not all(
            s is None or (isinstance(s, int) and not isinstance(s, bool) and s > 0) for s in shape):
        raise _err(f"{where}.shape", f"must be a list of positive ints or null, got {shape!r}")
    dtype = d.get("dtype", "float32")
    if dtype not in DTYPES:
        raise _err(f"{where}.dtype", f"{dtype!r} not one of {DTYPES}")
    lo, hi = d.get("min"), d.get("max")
    for k, v in (("min", lo), ("max", hi)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)):
            raise _err(f"{where}.{k}", "must be a finite number")
    if lo is not None and hi is not None and lo > hi:
        raise _err(where, f"min {lo} > max {hi}")
    return TensorSpec(str(name), tuple(shape), dtype, lo, hi)


def parse_manifest(d: Any) -> Manifest:
    """Validate a manifest dict (pure). Raises BundleError naming the field."""
    if not isinstance(d, dict):
        raise BundleError("manifest must be a JSON object")
    for k in ("name", "version"):
        if not isinstance(d.get(k), str) or not d[k] or len(d[k]) > 128:
            raise _err(k, "must be a non-empty string of at most 128 chars")
    files = d.get("files")
    if not isinstance(files, dict) or not files:
        raise _err("files", "must be a non-empty object")
    entries: dict[str, FileEntry] = {}
    for name, e in files.items():
        p = Path(name)
        if not name or p.is_absolute() or ".." in p.parts or name.startswith(".") or name == MANIFEST:
            raise _err(f"files[{name!r}]", "unsafe or reserved file name")
        if not isinstance(e, dict):
            raise _err(f"files[{name!r}]", "must be an object")
        sha, size, role = e.get("sha256"), e.get("size"), e.get("role", "other")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise _err(f"files[{name!r}].sha256", "must be 64 lowercase hex chars")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _err(f"files[{name!r}].size", "must be a non-negative integer")
        if role not in ROLES:
            raise _err(f"files[{name!r}].role", f"{role!r} not one of {ROLES}")
        entries[name] = FileEntry(sha, size, role)
    backbones = [n for n, e in entries.items() if e.role == "backbone"]
    if len(backbones) != 1:
        raise _err("files", f"needs exactly one file with role 'backbone', found {len(backbones)}")
    if Path(backbones[0]).suffix not in (".onnx", ".tflite"):
        raise _err(f"files[{backbones[0]!r}]", "backbone must be .onnx or .tflite")
    heads = [n for n, e in entries.items() if e.role == "head"]
    if len(heads) > 1:
        raise _err("files", "at most one head")
    labels = d.get("labels", [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise _err("labels", "must be a list of strings")
    if d.get("inputs") is not None:
        if not isinstance(d["inputs"], list) or not d["inputs"] or len(d["inputs"]) > 16:
            raise _err("inputs", "must be a non-empty list of at most 16 tensor specs")
        inputs = tuple(_spec(x, f"inputs[{i}]") for i, x in enumerate(d["inputs"]))
        if d.get("input") is not None and _spec(d["input"], "input") != inputs[0]:
            raise _err("input", "differs from inputs[0]")
    else:
        inputs = (_spec(d.get("input"), "input"),)
    inp = inputs[0]
    outputs: tuple[TensorSpec, ...] = ()
    if d.get("outputs") is not None:
        if not isinstance(d["outputs"], list) or not d["outputs"] or len(d["outputs"]) > 16:
            raise _err("outputs", "must be a non-empty list of at most 16 tensor specs")
        outputs = tuple(_spec(x, f"outputs[{i}]") for i, x in enumerate(d["outputs"]))
    for where, specs in (("inputs", inputs), ("outputs", outputs)):
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise _err(where, f"tensor names must be unique, got {names}")
    task = d.get("task", "classify")
    if task not in TASKS:
        raise _err("task", f"{task!r} not one of {TASKS}")
    task_params = d.get("task_params") or {}
    if not isinstance(task_params, dict):
        raise _err("task_params", "must be an object")
    feats = _spec(d["features"], "features") if d.get("features") is not None else None
    for k in ("reference", "eval", "metrics"):
        if d.get(k) is not None and not isinstance(d[k], dict):
            raise _err(k, "must be an object")
    parent = d.get("parent_version")
    if parent is not None and not isinstance(parent, str):
        raise _err("parent_version", "must be a string or null")
    try:
        exits, segments, bottleneck = parse_exits(d, entries, task)
    except ExitsError as exc:
        raise BundleError(str(exc)) from None
    return Manifest(d["name"], d["version"], inp, feats, tuple(labels), entries, parent, d.get("created"),
                    d.get("metrics") or {}, d.get("reference"), d.get("eval"), d,
                    inputs, outputs, task, task_params, exits, segments, bottleneck)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    head: dict[str, np.ndarray] | None

    @property
    def backbone_path(self) -> Path:
        return self.path / str(self.manifest.file("backbone"))

    @property
    def id(self) -> str:
        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()

    def npz(self, role: str) -> dict[str, np.ndarray] | None:
        name = self.manifest.file(role)
        if name is None:
            return None
        with np.load(self.path / name, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_bundle(path: str | Path) -> Bundle:
    """Read, hash-check and return a bundle; BundleError with the reason otherwise."""
    p = Path(path)
    mp = p / MANIFEST
    try:
        if mp.stat().st_size > MAX_MANIFEST_BYTES:
            raise BundleError(f"{mp}: larger than {MAX_MANIFEST_BYTES} bytes")
        d = json.loads(mp.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{p}: no {MANIFEST} (not a bundle directory)") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{mp}: cannot read JSON: {exc}") from None
    m = parse_manifest(d)
    for name, e in m.files.items():
        f = p / name
        try:
            size = f.stat().st_size
        except OSError:
            raise BundleError(f"{name}: missing from the bundle") from None
        if size != e.size:
            raise BundleError(f"{name}: size {size} != manifest {e.size}")
        if _sha256(f) != e.sha256:
            raise BundleError(f"{name}: SHA-256 mismatch (corrupt or altered)")
    head = None
    hname = m.file("head")
    if hname:
        try:
            head = load_head(p / hname)
        except ValueError as exc:
            raise BundleError(f"{hname}: {exc}") from None
        if m.features is not None:
            fdim = m.features.shape[-1]
            if fdim is not None and head["dense0.weight"].shape[0] != fdim:
                raise BundleError(f"{hname}: dense0.weight takes {head['dense0.weight'].shape[0]} features, "
                                  f"the backbone gives {fdim}")
        if m.labels and head[f"dense{n_layers(head) - 1}.bias"].shape[0] != len(m.labels):
            raise BundleError(f"{hname}: head outputs {head[f'dense{n_layers(head) - 1}.bias'].shape[0]} classes, "
                              f"manifest has {len(m.labels)} labels")
    return Bundle(p, m, head)


# -- the head ------------------------------------------------------------------
def n_layers(head: Mapping[str, np.ndarray]) -> int:
    return sum(1 for k in head if k.endswith(".weight"))


def check_head(head: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate the head format (dense{i}.weight [in,out], dense{i}.bias [out], chained); float32 copy."""
    n = n_layers(head)
    if n == 0:
        raise ValueError("head has no dense0.weight")
    expected = {f"dense{i}.{p}" for i in range(n) for p in ("weight", "bias")}
    if set(head) != expected:
        raise ValueError(f"head tensors {sorted(head)} != expected {sorted(expected)}")
    out: dict[str, np.ndarray] = {}
    prev = None
    for i in range(n):
        w, b = np.asarray(head[f"dense{i}.weight"]), np.asarray(head[f"dense{i}.bias"])
        if w.ndim != 2 or b.ndim != 1 or w.shape[1] != b.shape[0]:
            raise ValueError(f"dense{i}: weight {list(w.shape)} / bias {list(b.shape)} do not fit")
        if prev is not None and w.shape[0] != prev:
            raise ValueError(f"dense{i}: takes {w.shape[0]} inputs, previous layer gives {prev}")
        if not (np.all(np.isfinite(w)) and np.all(np.isfinite(b))):
            raise ValueError(f"dense{i}: NaN or inf values")
        out[f"dense{i}.weight"] = w.astype(np.float32)
        out[f"dense{i}.bias"] = b.astype(np.float32)
        prev = w.shape[1]
    return out


def load_head(path: str | Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            raw = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read head: {exc}") from None
    return check_head(raw)


def head_bytes(head: Mapping[str, np.ndarray]) -> bytes:
    """A head as a canonical ``.npz`` (same tensors, same bytes): patches can then ship only the
    tensors that changed and the board rebuild the file bit for bit (protocol/npzdelta.py)."""
    from .npzdelta import npz_bytes

    return npz_bytes({k: np.asarray(v, np.float32) for k, v in head.items()})


def save_head_atomic(path: str | Path, head: Mapping[str, np.ndarray]) -> None:
    """Write a head by temp file + fsync + rename: a reader sees the old or the new, never half."""
    p = Path(path)
    data = head_bytes(check_head(head))
    write_atomic(p, data)


def head_forward(head: Mapping[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Logits for a batch of features [n, in] (pure numpy; ReLU between layers)."""
    x = features
    n = n_layers(head)
    for i in range(n):
        x = x @ head[f"dense{i}.weight"] + head[f"dense{i}.bias"]
        if i < n - 1:
            np.maximum(x, 0, out=x)
    return x


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def write_manifest(bundle_dir: str | Path, manifest: dict[str, Any]) -> None:
    """Fill in every file's hash and size, then write manifest.json atomically."""
    p = Path(bundle_dir)
    for name, e in manifest["files"].items():
        e["sha256"] = _sha256(p / name)
        e["size"] = (p / name).stat().st_size
    parse_manifest(manifest)
    write_atomic(p / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
