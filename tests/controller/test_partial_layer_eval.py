"""Per-round accuracy of a run over chosen layers (issue 20): the run carries only the trainable
tensors, and the evaluator puts them back on the bundle's frozen layers (it recorded
``accuracy_error`` before). Real bundle, real ONNX Runtime backbone; no broker."""
from __future__ import annotations

import json

import numpy as np

from controller.cli.round import _eval_features, load_head
from controller.fl.engine import RunConfig
from controller.fl.runner import evaluator_for
from protocol.bundle import head_forward, load_bundle


def _two_layer(src, d):
    from tests.protocol.test_npzdelta import _two_layer_base

    return _two_layer_base(src, d)


def test_a_partial_layer_head_is_evaluated_on_the_frozen_layers(tmp_path, example_bundle):
    b, full = _two_layer(example_bundle[0], tmp_path / "b")
    part = load_head(str(b))
    assert sorted(part) == ["dense1.bias", "dense1.weight"]          # what the run carries
    ev = _eval_features(str(b), tmp_path / "eval.npz")
    assert ev is not None
    evaluate = evaluator_for(RunConfig(eval_file=str(ev)))
    with np.load(ev) as z:
        feats, y = z["features"], z["y"]
    want = float((head_forward(full, feats).argmax(1) == y).mean())
    assert evaluate(part) == want and want > 0.9                      # the same predictions as the 1-layer head
    moved = {k: v * 0 for k, v in part.items()}                       # a new round's layers count
    assert evaluate(moved) == float((head_forward({**full, **moved}, feats).argmax(1) == y).mean())
    assert evaluate(full) == want                                     # a whole head still works


def test_an_eval_file_without_the_whole_head_still_evaluates_whole_heads(tmp_path):
    rng = np.random.default_rng(1)
    head = {"dense0.weight": rng.normal(size=(8, 3)).astype(np.float32), "dense0.bias": np.zeros(3, np.float32)}
    feats = rng.normal(size=(20, 8)).astype(np.float32)
    y = head_forward(head, feats).argmax(1)
    np.savez(tmp_path / "e.npz", features=feats, y=y)                 # an older run's eval file
    assert evaluator_for(RunConfig(eval_file=str(tmp_path / "e.npz")))(head) == 1.0
