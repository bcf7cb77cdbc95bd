"""``fleetctl model …``: build, quantize, split and inspect model bundles."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def model() -> None:
    """Model bundles: build-example, quantize, split, inspect."""


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
@click.option("--calibration", type=click.Path(exists=True, dir_okay=False), help=".npy of real input samples")
@click.option("--dynamic", is_flag=True, help="dynamic quantization (weights only; no calibration data)")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def quantize(model_path: str, calibration: str | None, dynamic: bool, out: str) -> None:
    """Quantize an ONNX model to int8 (static with calibration data, or --dynamic)."""
    import numpy as np

    from ..modeltools.onnx_export import quantize_dynamic_int8, quantize_static_int8

    if dynamic:
        quantize_dynamic_int8(model_path, out)
    else:
        if not calibration:
            raise click.UsageError("static quantization needs --calibration DATA.npy (or use --dynamic)")
        try:
            data = np.load(calibration, allow_pickle=False).astype(np.float32)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"cannot read {calibration}: {exc}", param_hint="--calibration") from None
        if data.ndim < 2 or len(data) < 8:
            raise click.BadParameter("need at least 8 samples as an array [n, ...]", param_hint="--calibration")
        import onnx

        name = onnx.load(model_path, load_external_data=False).graph.input[0].name
        quantize_static_int8(model_path, out, data, input_name=name)
    a, b = Path(model_path).stat().st_size, Path(out).stat().st_size
    click.echo(f"{out}: {a / 1024:.0f} KB → {b / 1024:.0f} KB ({a / max(1, b):.2f}x smaller)")


@model.command()
@click.argument("model_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--at", "at", required=True, help="tensor name where the backbone ends (its output = features)")
@click.option("-o", "--out", required=True, type=click.Path(file_okay=False))
@click.option("--name", default=None, help="bundle name (default: the file stem)")
@click.option("--version", "version", default="1.0.0", show_default=True)
@click.option("--input-min", type=float, default=None)
@click.option("--input-max", type=float, default=None)
def split(model_path: str, at: str, out: str, name: str | None, version: str, input_min: float | None,
          input_max: float | None) -> None:
    """Cut a single ONNX graph into backbone + head bundle at tensor --at."""
    from ..modeltools.split import SplitError, split_model

    try:
        split_model(model_path, at, out, name or Path(model_path).stem, version, input_min, input_max)
    except SplitError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{out}: backbone.onnx + head.npz (cut at {at})")


@model.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(bundle: str, as_json: bool) -> None:
    """Verify a bundle and show what is in it."""
    from protocol.bundle import BundleError, load_bundle, n_layers

    try:
        b = load_bundle(bundle)
    except BundleError as exc:
        raise click.ClickException(f"bad bundle: {exc}") from None
    m = b.manifest
    info = {"name": m.name, "version": m.version, "parent_version": m.parent_version, "id": b.id,
            "input": m.input.to_dict(), "features": m.features.to_dict() if m.features else None,
            "labels": list(m.labels), "files": {n: {"role": e.role, "size": e.size, "sha256": e.sha256}
                                                for n, e in m.files.items()},
            "head_layers": n_layers(b.head) if b.head else 0, "metrics": dict(m.metrics)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{m.name} {m.version}  ({b.id[:16]}, verified)")
    click.echo(f"  input    {info['input']}")
    click.echo(f"  features {info['features']}")
    click.echo(f"  labels   {', '.join(m.labels) or '-'}   head layers {info['head_layers']}")
    for n, e in m.files.items():
        click.echo(f"  {n:<16} {e.role:<10} {e.size:>10} B  {e.sha256[:16]}")
    if m.metrics:
        click.echo(f"  metrics  {json.dumps(dict(m.metrics))}")
