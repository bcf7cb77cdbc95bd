"""``fleetctl model exits`` / ``model bottleneck`` on the shapes CNN: bundles that load and
verify, and refusals that name what is wrong (no tracebacks)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from controller.cli import cli
from protocol.bundle import load_bundle
from tests.helpers.bundles import cached_cnn


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from controller.modeltools.cnn import make_shapes

    p = tmp_path_factory.mktemp("d") / "data.npz"
    x, y = make_shapes(800, 11)
    np.savez(p, x=x, y=y)
    return p


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_exits_then_bottleneck_from_the_cli(tmp_path, small_data):
    src, _ = cached_cnn()
    out = run("model", "exits", src, "--exit", "block2", "--exit", "block3", "--data", small_data,
              "-o", tmp_path / "ex")
    assert out.exit_code == 0, out.output
    assert "exits at block2, block3" in out.output and "distilled" in out.output and "compute saved" in out.output
    b = load_bundle(tmp_path / "ex")
    assert [e.tensor for e in b.manifest.exits] == ["block2", "block3"] and len(b.manifest.segments) == 3
    out = run("model", "bottleneck", tmp_path / "ex", "--ratio", "0.25", "--data", small_data, "--epochs", "2",
              "--max-drop", "0.2", "-o", tmp_path / "bn", "--json")
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["at"] == "block3" and r["channels"] == 8 and r["code_bytes"] == 8 * 4 * 4
    bn = load_bundle(tmp_path / "bn").manifest.bottleneck
    assert bn.at == "block3" and bn.code_shape == (8, 4, 4) and {"encoder.onnx", "decoder.onnx"} <= set(
        load_bundle(tmp_path / "bn").manifest.files)
    # one version carries the pair: a second bottleneck on top is refused, as is an existing OUT
    again = run("model", "bottleneck", tmp_path / "bn", "--ratio", "0.25", "-o", tmp_path / "bn2")
    assert again.exit_code == 1 and "already has a bottleneck" in again.output
    exists = run("model", "bottleneck", tmp_path / "ex", "--ratio", "0.25", "--data", small_data, "-o",
                 tmp_path / "bn")
    assert exists.exit_code == 1 and "exists" in exists.output


@pytest.mark.parametrize("args, message", [
    (["model", "exits", "{src}", "--exit", "nope", "-o", "{tmp}/x"], "'nope' is not produced"),
    (["model", "exits", "{src}", "--exit", "features", "-o", "{tmp}/x"], "is the backbone's output"),
    (["model", "exits", "{src}", "--exit", "block2", "--threshold", "0.9", "--threshold", "0.8", "-o", "{tmp}/x"],
     "2 threshold(s) for 1 exit(s)"),
    (["model", "bottleneck", "{src}", "--ratio", "0.5", "-o", "{tmp}/x"], "has no exits"),
    (["model", "bottleneck", "{src}", "--ratio", "0", "-o", "{tmp}/x"], "--ratio must be in (0, 1]"),
])
def test_refusals_name_the_problem(tmp_path, args, message):
    src, _ = cached_cnn()
    out = CliRunner().invoke(cli, [a.format(src=src, tmp=tmp_path) for a in args])
    assert out.exit_code != 0 and message in out.output, out.output
    assert "Traceback" not in out.output
