"""Deep verification: a bundle's manifest against the model's inputs and outputs as a runtime reads them.

One pure function, used by both sides, so that what ``fleetctl model inspect`` calls verified is
what the agent will serve: ``verify(manifest, model_inputs, model_outputs, head)`` returns the
problems found (an empty list = the manifest describes the model). The IO comes from whatever
loaded the model (ONNX Runtime, LiteRT, the onnx protobuf): ``io_of_runtime`` reads it from the
agent's runtime adapters without importing them (protocol imports no side).

Rules: every manifest input and served output exists in the model by name, with the same rank,
every static dimension equal and the dtype equal (a quantized LiteRT tensor takes float32: the
runtime converts with its own scale); only the batch dimension may be dynamic in the manifest,
unless ``task_params["dynamic_dims"]`` is true; the label count matches the head's output, or the
classified output's size when there is no head; detect's named outputs exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from .bundle import Manifest, TensorSpec


@dataclass(frozen=True)
class ModelIO:
    """One model input or output as the runtime reports it (None = a dynamic dimension)."""

    name: str
    shape: tuple[int | None, ...] | None
    dtype: str
    quantized: bool = False


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" (the agent refuses the bundle) or "warning" (logged, served)
    where: str     # the manifest field, e.g. "inputs[0].shape"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def errors(problems: Iterable[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


def _dims(shape: Sequence[int | None] | None) -> list[int | None] | None:
    return None if shape is None else [d if isinstance(d, int) and d > 0 else None for d in shape]


def _check_tensor(spec: TensorSpec, io: ModelIO, where: str, dynamic_ok: bool) -> list[Problem]:
    out: list[Problem] = []
    mdims = _dims(io.shape)
    if mdims is not None:
        if len(mdims) != len(spec.shape):
            out.append(Problem("error", f"{where}.shape", f"{list(spec.shape)} has rank {len(spec.shape)}; "
                                                          f"the model's {io.name!r} is {mdims} (rank {len(mdims)})"))
        else:
            for i, (s, m) in enumerate(zip(spec.shape, mdims)):
                if s is not None and m is not None and s != m and not (i == 0 and m == 1 and s is None):
                    out.append(Problem("error", f"{where}.shape", f"dimension {i} is {s}; the model's {io.name!r} "
                                                                  f"has {m} ({mdims})"))
    if not dynamic_ok:
        dyn = [i for i, s in enumerate(spec.shape) if s is None and i > 0]
        if dyn:
            out.append(Problem("error", f"{where}.shape",
                               f"{list(spec.shape)}: dimension(s) {dyn} dynamic; only the batch may be "
                               "(fix them with --input-shape, or declare task_params.dynamic_dims)"))
    if spec.dtype != io.dtype and not (io.quantized and spec.dtype == "float32"):
        out.append(Problem("error", f"{where}.dtype", f"{spec.dtype}; the model's {io.name!r} is {io.dtype}"))
    return out


def _match(specs: Sequence[TensorSpec], model: Sequence[ModelIO], kind: str,
           where: str) -> tuple[list[tuple[TensorSpec, ModelIO, str]], list[Problem]]:
    by_name = {m.name: m for m in model}
    pairs: list[tuple[TensorSpec, ModelIO, str]] = []
    problems: list[Problem] = []
    for i, s in enumerate(specs):
        w = f"{where}[{i}]"
        if s.name in by_name:
            pairs.append((s, by_name[s.name], w))
        elif kind == "input" and len(specs) == 1 and len(model) == 1:
            # one input, fed by position: an old manifest's generic name still serves
            pairs.append((s, model[0], w))
            problems.append(Problem("warning", f"{w}.name", f"{s.name!r} is not the model's input name "
                                                            f"{model[0].name!r} (fed by position)"))
        else:
            problems.append(Problem("error", f"{w}.name", f"the model has no {kind} {s.name!r} "
                                                          f"(it has {[m.name for m in model]})"))
    return pairs, problems


def _size(shape: Sequence[int | None] | None) -> int | None:
    """Values per sample (the batch dimension left out); None when a dimension is dynamic."""
    if shape is None or not shape:
        return None
    n = 1
    for d in list(shape)[1:]:
        if d is None:
            return None
        n *= d
    return n


def verify(manifest: Manifest, model_inputs: Sequence[ModelIO], model_outputs: Sequence[ModelIO],
           head: Mapping[str, Any] | None = None) -> list[Problem]:
    """Every problem between the manifest and the model (pure; no file or runtime access)."""
    problems: list[Problem] = []
    params = manifest.task_params or {}
    dynamic_ok = bool(params.get("dynamic_dims"))
    inputs = manifest.inputs or (manifest.input,)
    pairs, p = _match(inputs, model_inputs, "input", "inputs" if manifest.raw.get("inputs") else "input")
    problems += p
    for spec, io, w in pairs:
        problems += _check_tensor(spec, io, w, dynamic_ok)
    if len(inputs) < len(model_inputs):
        missing = [m.name for m in model_inputs if m.name not in {s.name for s in inputs}]
        problems.append(Problem("error", "inputs", f"the model also needs {missing}; the manifest lists "
                                                   f"{[s.name for s in inputs]}"))
    if not model_outputs:
        return problems + [Problem("error", "outputs", "the model has no outputs")]
    served = list(manifest.outputs)
    opairs, p = _match(served, model_outputs, "output", "outputs")
    problems += p
    for spec, io, w in opairs:
        problems += _check_tensor(spec, io, w, True)
    first = opairs[0][1] if opairs else (model_outputs[0] if not served else None)
    if manifest.features is not None:
        f = manifest.features
        fio = next((m for m in model_outputs if m.name == f.name), first)
        if fio is not None:
            fdims = _dims(fio.shape)
            if fdims and f.shape[-1] is not None and fdims[-1] is not None and fdims[-1] != f.shape[-1]:
                problems.append(Problem("error", "features.shape", f"last dimension {f.shape[-1]}; the backbone's "
                                                                   f"{fio.name!r} gives {fdims[-1]}"))
    if head is not None:
        n_w = sum(1 for k in head if k.endswith(".weight"))
        w0, bl = head.get("dense0.weight"), head.get(f"dense{n_w - 1}.bias")
        feat = _size(first.shape) if first is not None else None
        if w0 is not None and feat is not None and w0.shape[0] != feat:
            problems.append(Problem("error", "head", f"dense0.weight takes {w0.shape[0]} features; the backbone's "
                                                     f"{first.name!r} gives {feat}"))
        if bl is not None and manifest.labels and bl.shape[0] != len(manifest.labels):
            problems.append(Problem("error", "labels", f"{len(manifest.labels)} labels; the head outputs "
                                                       f"{bl.shape[0]} classes"))
    elif manifest.task == "classify" and manifest.labels and first is not None:
        n = _size(first.shape)
        if n is not None and n != len(manifest.labels):
            problems.append(Problem("error", "labels", f"{len(manifest.labels)} labels; the model's {first.name!r} "
                                                       f"has {n} values per sample"))
    if manifest.task == "detect":
        names = {m.name for m in model_outputs}
        for key in ("boxes", "scores"):
            if not params.get(key):
                problems.append(Problem("error", f"task_params.{key}", "detect needs the output's name"))
        for key in ("boxes", "scores", "classes"):
            v = params.get(key)
            if v and v not in names:
                problems.append(Problem("error", f"task_params.{key}", f"the model has no output {v!r}"))
    return problems


# -- reading a runtime's IO (duck-typed: protocol never imports the agent) ---------------------------
def _ort_io(items: Any) -> list[ModelIO]:
    from_ort = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int8)": "int8",
                "tensor(uint8)": "uint8", "tensor(int64)": "int64", "tensor(int32)": "int32",
                "tensor(double)": "float64", "tensor(bool)": "bool", "tensor(string)": "string"}
    out = []
    for i in items:
        shape = i.shape if isinstance(i.shape, (list, tuple)) else None
        out.append(ModelIO(i.name, None if shape is None else tuple(d if isinstance(d, int) else None for d in shape),
                           from_ort.get(i.type, str(i.type))))
    return out


def _litert_io(details: Any) -> list[ModelIO]:
    import numpy as np

    out = []
    for d in details:
        q = d.get("quantization", (0.0, 0))
        sig = d.get("shape_signature")
        shape = tuple(int(x) if x > 0 else None for x in (sig if sig is not None and len(sig) else d["shape"]))
        out.append(ModelIO(d["name"], shape, np.dtype(d["dtype"]).name, bool(q and q[0])))
    return out


def io_of_runtime(rt: Any) -> tuple[list[ModelIO], list[ModelIO]]:
    """All inputs and outputs of a loaded runtime: an ONNX Runtime session, a LiteRT interpreter,
    or the agent's adapters around them (``.session`` / ``.interp``)."""
    sess = getattr(rt, "session", rt)
    if hasattr(sess, "get_inputs") and hasattr(sess, "get_outputs"):
        return _ort_io(sess.get_inputs()), _ort_io(sess.get_outputs())
    interp = getattr(rt, "interp", rt)
    if hasattr(interp, "get_input_details"):
        return _litert_io(interp.get_input_details()), _litert_io(interp.get_output_details())
    ins = getattr(rt, "inputs", None) or [rt.input]
    outs = getattr(rt, "outputs", None) or [rt.output]
    conv = lambda xs: [ModelIO(x.name, tuple(x.shape), str(x.dtype)) for x in xs]  # noqa: E731
    return conv(ins), conv(outs)


def verify_segments(manifest: Manifest, segment_io: Sequence[tuple[Sequence[ModelIO], Sequence[ModelIO]]],
                    backbone_outputs: Sequence[ModelIO]) -> list[Problem]:
    """The segment chain of a bundle with early exits (pure): segment 0 takes the model's inputs,
    segment i > 0 takes exit i-1's tensor, segment i gives exit i's tensor and the last gives the
    backbone's first output — so running them in turn is running the backbone."""
    problems: list[Problem] = []
    exits = manifest.exits
    if len(segment_io) != len(exits) + 1:
        return [Problem("error", "segments", f"{len(segment_io)} segment(s) for {len(exits)} exit(s)")]
    model_in = [s.name for s in (manifest.inputs or (manifest.input,))]
    final = backbone_outputs[0].name if backbone_outputs else None
    for i, (ins, outs) in enumerate(segment_io):
        want_in = model_in if i == 0 else [exits[i - 1].tensor]
        want_out = exits[i].tensor if i < len(exits) else final
        got_in = [m.name for m in ins]
        if i == 0 and len(got_in) == len(want_in) == 1:
            pass   # old manifests name the input freely: matched by position, as the backbone is
        elif got_in != want_in:
            problems.append(Problem("error", f"segments[{i}]", f"takes {got_in}; expected {want_in}"))
        if [m.name for m in outs] != [want_out]:
            problems.append(Problem("error", f"segments[{i}]", f"gives {[m.name for m in outs]}; expected "
                                                               f"[{want_out!r}]"))
    return problems
