"""``fleetctl model …``: build, quantize, split and inspect model bundles."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def model() -> None:
    """Model bundles: import, inspect, build-example, quantize, split, exits, bottleneck, set-backbone, add-data."""


def _with_exits(bundle: str, exits: tuple[str, ...], data: str | None, echo: bool = True) -> None:
    """``--exit`` on split/import: the bundle just written gets its early exits in place."""
    from ..modeltools.exits import ExitError, add_exits
    from ..modeltools.quantize import quiet_ort

    try:
        with quiet_ort():
            r = add_exits(bundle, list(exits), bundle, data=data)
    except ExitError as exc:
        raise click.ClickException(f"--exit: {exc}") from None
    if echo:
        _echo_exits(bundle, r)


def _echo_exits(out: str, r: dict) -> None:
    click.echo(f"{out}: exits at {', '.join(r['tensors'])}; thresholds {r['thresholds']}; heads {r['training']} "
               f"on {r['trained_on']} samples")
    if "eval_accuracy_exits" in r:
        click.echo(f"  eval: accuracy {r['eval_accuracy_full']:.2%} (full) → {r['eval_accuracy_exits']:.2%} "
                   f"(exits), compute saved {r['eval_compute_saved']:.1%}, answered per exit {r['eval_exit_rates']}")
    else:
        click.echo(f"  held-out: agreement with the full model {r['heldout_agreement']:.2%}, compute saved "
                   f"{r['heldout_compute_saved']:.1%}")


@model.command("exits")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--exit", "exits", multiple=True, required=True, help="an exit tensor (repeatable, in model order)")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="inputs to distil the exit heads on (.npz with x, or .npy); default: the bundle's eval set")
@click.option("--agreement", type=float, default=0.992, show_default=True,
              help="answers must agree with the full model this often (held-out quarter of the data)")
@click.option("--pool", type=int, default=4, show_default=True, help="an exit head sees its tensor pooled to N×N")
@click.option("--threshold", "thresholds", type=float, multiple=True, help="fixed thresholds, one per exit")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def exits_cmd(bundle: str, exits: tuple[str, ...], data: str | None, agreement: float, pool: int,
              thresholds: tuple[float, ...], out: str, as_json: bool) -> None:
    """Add early exits: cut the backbone at each --exit tensor, distil a small head per exit."""
    from ..modeltools.exits import ExitError, add_exits
    from ..modeltools.quantize import quiet_ort

    if thresholds and len(thresholds) != len(exits):
        raise click.BadParameter(f"{len(thresholds)} threshold(s) for {len(exits)} exit(s)", param_hint="--threshold")
    if not 0 < agreement <= 1:
        raise click.BadParameter(f"{agreement}: must be in (0, 1]", param_hint="--agreement")
    try:
        with quiet_ort():
            r = add_exits(bundle, list(exits), out, data=data, agreement=agreement, pool=pool,
                          thresholds=list(thresholds) or None)
    except ExitError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    _echo_exits(out, r)


@model.command("bottleneck")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--ratio", type=float, required=True, help="channels kept at the cut (0.16 of 32 → 5)")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="inputs to train on (.npz with x, or .npy); default: the bundle's eval set")
@click.option("--at", "at", default=None, help="the exit tensor to cut at (default: the last exit)")
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--max-drop", type=float, default=0.01, show_default=True, help="refuse a pair that loses more accuracy")
@click.option("--levels", type=int, default=63, show_default=True,
              help="int8 code levels used by the 99.9th percentile (fewer: smaller after zstd, less exact)")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--json", "as_json", is_flag=True)
def bottleneck_cmd(bundle: str, ratio: float, data: str | None, at: str | None, epochs: int, max_drop: float,
                   levels: int, out: str, force: bool, as_json: bool) -> None:
    """Train a bottleneck at the split (BottleFit): int8 encoder on the board, decoder on the worker."""
    from ..modeltools.bottleneck import BottleneckError, add_bottleneck
    from ..modeltools.quantize import quiet_ort

    if epochs < 1:
        raise click.BadParameter(f"{epochs}: must be >= 1", param_hint="--epochs")
    try:
        with quiet_ort():
            r = add_bottleneck(bundle, out, ratio, data=data, at=at, epochs=epochs, max_drop=max_drop, force=force,
                               levels=levels)
    except BottleneckError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return
    acc = (f"accuracy {r.accuracy_full:.2%} → {r.accuracy_bottleneck:.2%} ({r.drop_pts:+.2f} pts lost), "
           if r.accuracy_full is not None else "")
    click.echo(f"{out}: bottleneck at {r.at}: {r.channels} channels (ratio {r.ratio}), code {r.code_bytes} B int8 "
               f"vs {r.tensor_bytes_fp32} B fp32; {acc}agreement {r.agreement:.2%}; {r.epochs} epochs in "
               f"{r.train_seconds:.1f} s ({r.training})")


@model.command("build-example")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--size", type=click.Choice(["small", "large"]), default="small", show_default=True,
              help="large = the offload worker's model (bigger head over the same features)")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--version", "version", default="1.0.0", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def build_example_cmd(out: str, size: str, seed: int, version: str, as_json: bool) -> None:
    """Train a real example bundle on scikit-learn's bundled digits (int8 ONNX backbone + float head)."""
    from ..modeltools.example import build_example

    r = build_example(out, size, seed=seed, version=version).to_dict()
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return
    click.echo(f"{out}: digits {size} v{version} in {r['seconds']} s\n"
               f"  backbone fp32 {r['fp32_bytes'] / 1024:.0f} KB → int8 {r['int8_bytes'] / 1024:.0f} KB "
               f"({r['int8_size_ratio']:.2f}x smaller)\n"
               f"  accuracy fp32 {r['fp32_accuracy']:.2%} → int8 {r['int8_accuracy']:.2%} "
               f"(drop {r['int8_accuracy_drop_pts']:.2f} pts)")


@model.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help=".npy of real input samples [n, ...] (or .npz with x)")
@click.option("--dynamic", is_flag=True, help="dynamic quantization (weights only; no calibration data)")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def quantize(model_path: str, calibration: str | None, dynamic: bool, out: str) -> None:
    """Quantize an ONNX model to int8 (static with calibration data, or --dynamic).

    Refuses (exit 1, the reason) a model with nothing to quantize; a result that is not smaller
    is reported as such and not written."""
    import os

    from ..modeltools.importer import ModelImportError, load_data
    from ..modeltools.normalize import ModelError, io_specs, load_onnx
    from ..modeltools.onnx_export import quantize_dynamic_int8
    from ..modeltools.quantize import QuantizeError, quantizable, quantize_model, quiet_ort, size_line

    try:
        m = load_onnx(model_path)
    except ModelError as exc:
        raise click.ClickException(str(exc)) from None
    if not dynamic and not calibration:
        raise click.UsageError("static quantization needs --calibration DATA.npy (or use --dynamic)")
    if not quantizable(m):
        raise click.ClickException(f"nothing to quantize in {Path(model_path).name}: none of its ops "
                                   f"({', '.join(sorted({n.op_type for n in m.graph.node}))}) has an int8 form in "
                                   "ONNX Runtime (MatMul, Gemm, Conv, …): keep the fp32 model")
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        if dynamic:
            try:
                with quiet_ort():
                    quantize_dynamic_int8(model_path, tmp)
            except Exception as exc:  # noqa: BLE001 - the quantizer raises whatever its passes raise
                raise click.ClickException(f"ONNX Runtime could not quantize it: {type(exc).__name__}: {exc}") from None
        else:
            ins, _ = io_specs(m)
            ins = [{**i, "shape": [1] + list((i["shape"] or [None])[1:])} for i in ins]
            try:
                feeds, _ = load_data(calibration, ins)
            except ModelImportError as exc:
                raise click.BadParameter(str(exc), param_hint="--calibration") from None
            if len(feeds) < 8:
                raise click.BadParameter("need at least 8 samples as an array [n, ...]", param_hint="--calibration")
            try:
                fmt = quantize_model(model_path, tmp, feeds[:256])
            except QuantizeError as exc:
                raise click.ClickException(str(exc)) from None
        a, b = Path(model_path).stat().st_size, Path(tmp).stat().st_size
        if b >= a:
            raise click.ClickException(f"int8 is not smaller: {size_line(a, b)}; kept nothing, use the fp32 model")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    click.echo(f"{out}: {size_line(a, b)}" + ("" if dynamic else f" [{fmt}]"))


@model.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--at", "at", required=True, help="tensor name where the backbone ends (its output = features)")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--name", default=None, help="bundle name (default: the file stem)")
@click.option("--version", "version", default="1.0.0", show_default=True)
@click.option("--input-min", type=float, default=None)
@click.option("--input-max", type=float, default=None)
@click.option("--exit", "exits", multiple=True, help="an early-exit tensor (repeatable; see `model exits`)")
@click.option("--exit-data", type=click.Path(exists=True, dir_okay=False), help="inputs to distil the exit heads on")
def split(model_path: str, at: str, out: str, name: str | None, version: str, input_min: float | None,
          input_max: float | None, exits: tuple[str, ...], exit_data: str | None) -> None:
    """Cut a single ONNX graph into backbone + head bundle at tensor --at."""
    from ..modeltools.split import SplitError, split_model

    try:
        split_model(model_path, at, out, name or Path(model_path).stem, version, input_min, input_max)
    except SplitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{out}: backbone.onnx + head.npz (cut at {at})")
    if exits:
        _with_exits(out, exits, exit_data)


@model.command()
@click.argument("path", type=click.Path(exists=True))
@click.option("--input-shape", default=None, help="raw model: the sample shape to assume, e.g. 1,3,224,224")
@click.option("--json", "as_json", is_flag=True)
def inspect(path: str, input_shape: str | None, as_json: bool) -> None:
    """Describe a raw .onnx/.tflite model (IO, ops, cut candidates) or deep-verify a bundle directory."""
    if Path(path).is_file():
        _inspect_file(path, input_shape, as_json)
        return
    from protocol.bundle import BundleError, load_bundle, n_layers

    from ..modeltools.importer import deep_verify

    try:
        b = load_bundle(path)
        problems = deep_verify(path)
    except (BundleError, ValueError) as exc:
        raise click.ClickException(f"bad bundle: {exc}") from None
    m = b.manifest
    bad = [str(p) for p in problems if p.severity == "error"]
    info = {"name": m.name, "version": m.version, "parent_version": m.parent_version, "id": b.id,
            "task": m.task, "input": m.input.to_dict(), "inputs": [s.to_dict() for s in (m.inputs or (m.input,))],
            "outputs": [s.to_dict() for s in m.outputs],
            "features": m.features.to_dict() if m.features else None,
            "labels": list(m.labels), "files": {n: {"role": e.role, "size": e.size, "sha256": e.sha256}
                                                for n, e in m.files.items()},
            "head_layers": n_layers(b.head) if b.head else 0, "metrics": dict(m.metrics),
            "verified": not bad, "problems": bad,
            "warnings": [str(p) for p in problems if p.severity != "error"]}
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"{m.name} {m.version}  ({b.id[:16]}, {'verified' if not bad else 'NOT VERIFIED'})  task {m.task}")
        for s in info["inputs"]:
            click.echo(f"  input    {s}")
        for s in info["outputs"]:
            click.echo(f"  output   {s}")
        click.echo(f"  features {info['features']}")
        click.echo(f"  labels   {', '.join(m.labels[:20]) or '-'}{' …' if len(m.labels) > 20 else ''}"
                   f"   head layers {info['head_layers']}")
        for n, e in m.files.items():
            click.echo(f"  {n:<16} {e.role:<10} {e.size:>10} B  {e.sha256[:16]}")
        if m.metrics:
            click.echo(f"  metrics  {json.dumps(dict(m.metrics))}")
        for w in info["warnings"]:
            click.echo(f"  warning: {w}")
        for p in bad:
            click.echo(f"  problem: {p}")
    if bad:
        raise click.ClickException(f"bundle does not match its model: {'; '.join(bad)}")


def _inspect_file(path: str, input_shape: str | None, as_json: bool) -> None:
    from ..modeltools.describe import describe_file
    from ..modeltools.normalize import parse_shape

    try:
        info = describe_file(path, parse_shape(input_shape) if input_shape else None)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    extra = f"  opset {info['opset']}  {info.get('producer', '')}" if info["format"] == "onnx" else ""
    click.echo(f"{info['file']}: {info['format']}, {info['bytes'] / 1024:.0f} KB{extra}")
    for kind in ("inputs", "outputs"):
        for s in info[kind]:
            q = " (quantized)" if s.get("quantized") else ""
            click.echo(f"  {kind[:-1]:<7}{s['name']:<32} {str(s['shape']):<22} {s['dtype']}{q}")
    click.echo("  ops     " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    if info["format"] == "onnx":
        click.echo(f"  initializers {info['initializers']}")
        if info["candidates"]:
            click.echo("  cut candidates (a dense head follows; --cut auto takes the marked one):")
            for c in info["candidates"]:
                mark = "*" if c["tensor"] == info.get("auto_cut") else " "
                click.echo(f"   {mark} {c['tensor']:<32} {str(c['shape']):<14} head {c['head_layers']} layer(s), "
                           f"{c['features']} features → {c['classes']}")
        else:
            click.echo("  cut candidates: none (no dense head at the end: import the model whole)")
    for n in info.get("notes", []):
        click.echo(f"  note: {n}")


@model.command("import")
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--name", default=None, help="bundle name (default: the file stem)")
@click.option("--version", "version", default="1.0.0", show_default=True)
@click.option("--task", type=click.Choice(["classify", "regress", "detect", "embed", "raw"]), default="classify",
              show_default=True)
@click.option("--labels", "labels_file", type=click.Path(exists=True, dir_okay=False), help="one label per line")
@click.option("--input-shape", default=None, help="the sample shape with batch, e.g. 1,3,224,224 (N = dynamic batch)")
@click.option("--cut", default=None, help="'auto' (the last feature layer) or a tensor: dense layers after it → head")
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False),
              help="inputs for int8 calibration: .npy [n, ...] or .npz with x (and y)")
@click.option("--eval", "eval_", type=click.Path(exists=True, dir_okay=False),
              help="labelled set .npz with x and y: accuracy, the bundle's eval gate")
@click.option("--input-min", type=float, default=None)
@click.option("--input-max", type=float, default=None)
@click.option("--task-param", "task_params", multiple=True, help="KEY=VALUE, e.g. boxes=NAME scores=NAME threshold=0.5")
@click.option("--max-drop", type=float, default=0.02, show_default=True, help="warn when int8 loses more accuracy")
@click.option("--no-quantize", is_flag=True, help="keep the backbone fp32")
@click.option("--force", is_flag=True, help="replace OUT if it exists")
@click.option("--json", "as_json", is_flag=True)
@click.option("--exit", "exits", multiple=True,
              help="an early-exit tensor (repeatable); heads distilled on --calibration (see `model exits`)")
def import_cmd(model_path: str, out: str, name: str | None, version: str, task: str, labels_file: str | None,
               input_shape: str | None, cut: str | None, calibration: str | None, eval_: str | None,
               input_min: float | None, input_max: float | None, task_params: tuple[str, ...], max_drop: float,
               no_quantize: bool, force: bool, as_json: bool, exits: tuple[str, ...]) -> None:
    """Turn an ONNX or TFLite export into a verified bundle (normalise, cut, quantize, compare, verify)."""
    from ..modeltools.importer import ModelImportError, ImportOptions, import_model, read_labels
    from ..modeltools.normalize import ModelError, parse_shape
    from ..modeltools.quantize import quiet_ort, size_line

    params: dict = {}
    for kv in task_params:
        if "=" not in kv:
            raise click.BadParameter(f"{kv!r}: KEY=VALUE", param_hint="--task-param")
        k, v = kv.split("=", 1)
        params[k] = _value(v)
    try:
        opt = ImportOptions(name or Path(model_path).stem, version, task,
                            read_labels(labels_file) if labels_file else None,
                            {"": parse_shape(input_shape)} if input_shape else None, cut, calibration, eval_,
                            input_min, input_max, params, max_drop, not no_quantize, force)
        with quiet_ort():
            rep = import_model(model_path, out, opt)
    except (ModelImportError, ModelError) as exc:
        raise click.ClickException(str(exc)) from None
    if exits:
        _with_exits(out, exits, calibration or eval_, echo=not as_json)
    if as_json:
        click.echo(json.dumps(rep.to_dict(), indent=2))
        return
    click.echo(f"{out}: {opt.name} {version} ({rep.runtime}, task {task}), verified")
    for n in rep.notes:
        click.echo(f"  {n}")
    if rep.candidates:
        click.echo("  cut candidates: " + ", ".join(f"{c['tensor']} ({c['head_layers']} layer(s), "
                                                     f"{c['features']}→{c['classes']})" for c in rep.candidates))
    if rep.cut:
        click.echo(f"  cut at {rep.cut}: backbone + head {rep.head}")
    c = rep.comparison
    if c:
        acc = (f"accuracy fp32 {c['fp32_accuracy']:.2%} → int8 {c['int8_accuracy']:.2%}, "
               if c.get("fp32_accuracy") is not None else "")
        agree = f"agreement {c['agreement']:.2%}, " if c.get("agreement") is not None else ""
        click.echo(f"  fp32 vs int8 ({c['format']}, {c['samples']} samples): size {size_line(c['fp32_bytes'], c['int8_bytes'])}, "
                   f"{acc}{agree}p50 {c['fp32_p50_ms']:.2f} → {c['int8_p50_ms']:.2f} ms")
    click.echo(f"  backbone kept: {rep.kept}")
    for w in rep.warnings:
        click.echo(f"  {w}", err=w.startswith("WARNING"))


def _value(v: str):
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


@model.command("set-backbone")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
def set_backbone_cmd(bundle: str, model_path: str) -> None:
    """Put another backbone (e.g. a quantized one) into a bundle; reference outputs are recomputed."""
    from protocol.bundle import BundleError

    from ..modeltools.describe import set_backbone
    from ..modeltools.importer import deep_verify
    from ..modeltools.quantize import quiet_ort

    try:
        with quiet_ort():
            r = set_backbone(bundle, model_path)
            bad = [str(p) for p in deep_verify(bundle) if p.severity == "error"]
    except (BundleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{bundle}: backbone {r['backbone']} ({r['bytes'] / 1024:.0f} KB)"
               + (f", reference agreement {r['reference_agreement']:.2%}" if "reference_agreement" in r else ""))
    if bad:
        raise click.ClickException(f"the bundle no longer matches its model: {'; '.join(bad)}")


@model.command("add-data")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("--role", type=click.Choice(["reference", "eval"]), required=True)
@click.option("--max-drop", type=float, default=0.02, show_default=True, help="eval: allowed accuracy drop")
def add_data_cmd(bundle: str, data: str, role: str, max_drop: float) -> None:
    """Add a reference set (outputs computed by the bundle's model) or a labelled eval set."""
    from protocol.bundle import BundleError

    from ..modeltools.describe import add_data
    from ..modeltools.quantize import quiet_ort

    try:
        with quiet_ort():
            r = add_data(bundle, role, data, max_drop=max_drop)
    except (BundleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{bundle}: {role}.npz with {r['samples']} samples"
               + (f", baseline accuracy {r['accuracy']:.2%}" if "accuracy" in r else ""))
