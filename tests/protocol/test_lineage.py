"""Lineage objects and the walk back to a version's origin (pure)."""
from __future__ import annotations

import pytest

from controller.cli.lineage import walk
from protocol.lineage import LineageError, of_manifest, summary, validate

SHA = "ab" * 32


def fed(**kw):
    return {"kind": "federated", "parent_version": "1.0.0", "run_id": "run-x", "rounds": [1, 2],
            "devices": ["a", "b"], "n_devices": 2, "strategy": "fedavg", "dp": {"epsilon": 1.5, "delta": 1e-5}, **kw}


def test_valid_kinds_and_summaries():
    assert "run-x" in summary(validate(fed())) and "ε=1.5" in summary(fed())
    built = {"kind": "built", "parent_version": None, "source": {"file": "m.onnx", "sha256": SHA},
             "calibration_sha256": SHA, "eval_sha256": None}
    assert "m.onnx" in summary(validate(built))
    assert summary(None) == "no lineage recorded"


@pytest.mark.parametrize("bad", [
    {"kind": "magic"}, fed(run_id=""), fed(n_devices=3), fed(rounds="1,2"), fed(parent_version=None),
    fed(dp={"eps": 1}), {"kind": "built", "parent_version": None, "source": {"sha256": "nothex"}},
    {"kind": "derived", "parent_version": 3}, "not an object"])
def test_invalid_lineage_is_named(bad):
    with pytest.raises(LineageError):
        validate(bad)


def test_manifest_and_lineage_must_agree_on_the_parent():
    assert of_manifest({"version": "2", "parent_version": "1.0.0", "lineage": fed()})["run_id"] == "run-x"
    assert of_manifest({"version": "1"}) is None
    with pytest.raises(LineageError):
        of_manifest({"version": "2", "parent_version": "0.9", "lineage": fed()})


def test_walk_follows_parents_and_stops_at_unknown_or_loops():
    store = {"1.0.0": {"version": "1.0.0", "lineage": {"kind": "built", "parent_version": None,
                                                        "source": {"file": "x", "sha256": SHA}}},
             "2": {"version": "2", "parent_version": "1.0.0", "lineage": fed()}}
    chain = walk({"version": "3", "parent_version": "2", "lineage": {"kind": "derived", "parent_version": "2"}},
                 store.get)
    assert [s["version"] for s in chain] == ["3", "2", "1.0.0"] and chain[1]["lineage"]["run_id"] == "run-x"
    orphan = walk({"version": "5", "parent_version": "4"}, store.get)
    assert [s["version"] for s in orphan] == ["5", "4"] and "not in the artifact store" in orphan[1]["summary"]
    loop = {"a": {"version": "a", "parent_version": "b"}, "b": {"version": "b", "parent_version": "a"}}
    assert len(walk(loop["a"], loop.get)) <= 3
