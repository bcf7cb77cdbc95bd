"""Early-exit and bottleneck manifest fields, exit pooling, segment-chain verification, threshold
search (pure: no files, no runtime)."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from protocol.bundle import BundleError, parse_manifest
from protocol.exits import exit_features, pair_id, split_tag
from protocol.offload import _check_request
from protocol.envelope import DecodeError
from protocol.verify import ModelIO, verify_segments

SHA = "a" * 64


def manifest(**extra):
    files = {"backbone.onnx": {"sha256": SHA, "size": 1, "role": "backbone"},
             "head.npz": {"sha256": SHA, "size": 1, "role": "head"},
             "segment0.onnx": {"sha256": SHA, "size": 1, "role": "segment"},
             "segment1.onnx": {"sha256": SHA, "size": 1, "role": "segment"},
             "segment2.onnx": {"sha256": SHA, "size": 1, "role": "segment"},
             "exit0.npz": {"sha256": SHA, "size": 1, "role": "exit_head"},
             "exit1.npz": {"sha256": SHA, "size": 1, "role": "exit_head"},
             "encoder.onnx": {"sha256": SHA, "size": 1, "role": "encoder"},
             "decoder.onnx": {"sha256": SHA, "size": 1, "role": "decoder"}}
    d = {"name": "shapes", "version": "1", "input": {"name": "image", "shape": [None, 32, 32, 3], "dtype": "uint8"},
         "labels": ["a", "b"], "files": files,
         "exits": [{"tensor": "block1", "head": "exit0.npz", "threshold": 0.9, "order": 0, "pool": 4, "compute": 0.13},
                   {"tensor": "block2", "head": "exit1.npz", "threshold": 0.8, "order": 1, "pool": 4, "compute": 0.48}],
         "segments": ["segment0.onnx", "segment1.onnx", "segment2.onnx"],
         "bottleneck": {"at": "block2", "encoder": "encoder.onnx", "decoder": "decoder.onnx", "id": "0123456789abcdef",
                        "channels": 5, "ratio": 0.156, "scale": 0.02, "codec": "int8+zstd", "code_shape": [5, 8, 8]}}
    d.update(extra)
    return d


def test_exits_and_bottleneck_parse_and_old_manifests_are_unchanged():
    m = parse_manifest(manifest())
    assert [e.tensor for e in m.exits] == ["block1", "block2"] and m.exits[1].threshold == 0.8
    assert m.segments == ("segment0.onnx", "segment1.onnx", "segment2.onnx")
    assert m.bottleneck.at == "block2" and m.bottleneck.code_shape == (5, 8, 8)
    old = manifest()
    for k in ("exits", "segments", "bottleneck"):
        del old[k]
    m = parse_manifest(old)
    assert m.exits == () and m.segments == () and m.bottleneck is None


@pytest.mark.parametrize("change, where", [
    (lambda d: d["exits"][0].update(threshold=1.5), "exits[0].threshold"),
    (lambda d: d["exits"][0].update(threshold=0), "exits[0].threshold"),
    (lambda d: d["exits"][1].update(order=0), "increasing order"),
    (lambda d: d["exits"][0].update(head="head.npz"), "role 'head', expected 'exit_head'"),
    (lambda d: d["exits"][0].update(head="missing.npz"), "not a file"),
    (lambda d: d["exits"][1].update(tensor="block1"), "distinct"),
    (lambda d: d["exits"][0].update(pool=0), "pool"),
    (lambda d: d.update(segments=["segment0.onnx", "segment1.onnx"]), "3 segment files"),
    (lambda d: d["bottleneck"].update(at="block9"), "bottleneck.at"),
    (lambda d: d["bottleneck"].update(codec="float"), "bottleneck.codec"),
    (lambda d: d["bottleneck"].update(encoder="decoder.onnx"), "bottleneck.encoder"),
    (lambda d: d.update(task="regress"), "classification"),
    (lambda d: d.update(exits="block1"), "exits"),
])
def test_bad_exit_fields_are_refused_naming_the_field(change, where):
    d = copy.deepcopy(manifest())
    change(d)
    with pytest.raises(BundleError, match=where.replace("[", r"\[").replace("]", r"\]")):
        parse_manifest(d)


def test_exit_features_average_pools_blocks_in_channel_order():
    t = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    f = exit_features(t, 2)
    assert f.shape == (2, 12)
    assert f[0, 0] == t[0, 0, :2, :2].mean() and f[1, 11] == t[1, 2, 2:, 2:].mean()
    assert np.array_equal(exit_features(t, 1), t.mean(axis=(2, 3)))
    flat = np.ones((1, 7), np.float32)
    assert exit_features(flat, 4) is flat or np.array_equal(exit_features(flat, 4), flat)


def io(name):
    return ModelIO(name, (None, 1), "float32")


def test_segment_chain_must_run_input_to_each_exit_to_the_backbone_output():
    m = parse_manifest(manifest())
    good = [([io("image")], [io("block1")]), ([io("block1")], [io("block2")]), ([io("block2")], [io("features")])]
    assert verify_segments(m, good, [io("features")]) == []
    bad = [good[0], ([io("block0")], [io("block2")]), ([io("block2")], [io("logits")])]
    probs = verify_segments(m, bad, [io("features")])
    assert [p.where for p in probs] == ["segments[1]", "segments[2]"]
    assert "expected ['block1']" in str(probs[0]) and "'features'" in str(probs[1])
    assert verify_segments(m, good[:2], [io("features")])[0].where == "segments"


def test_split_and_pair_ids_change_with_any_part():
    assert split_tag(SHA, "block2") != split_tag(SHA, "block1") != split_tag("b" * 64, "block1")
    base = pair_id("1" * 64, "2" * 64, SHA, "block2")
    assert len(base) == 16
    assert base != pair_id("1" * 64, "3" * 64, SHA, "block2") and base != pair_id("1" * 64, "2" * 64, SHA, "b1")


def test_offload_request_fields_for_exits_and_codes_are_additive():
    old = {"mode": "features", "deadline_ts": 1.0, "model": "m", "backbone_sha256": SHA, "scale": 0.1}
    _check_request(old)
    _check_request({"mode": "features", "deadline_ts": 1.0, "model": "m", "split": "ab" * 8, "exit": 1,
                    "scale": 0.1})
    _check_request({"mode": "features", "deadline_ts": 1.0, "model": "m", "split": "ab" * 8,   # exit: optional
                    "codec": "int8+zstd", "bottleneck": "cd" * 8})
    for bad, field in ((dict(codec="fp16", bottleneck="x"), "codec"), (dict(codec="int8+zstd"), "bottleneck"),
                       (dict(exit=-1, scale=0.1), "exit"), (dict(exit=True, scale=0.1), "exit"),
                       (dict(exit=0), "scale")):
        with pytest.raises(DecodeError) as ei:
            _check_request({"mode": "features", "deadline_ts": 1.0, "model": "m", "split": "ab" * 8, "exit": 1,
                            **bad})
        assert field in str(ei.value)


def test_threshold_search_saves_compute_within_the_agreement_bound():
    from controller.modeltools.exits import pick_thresholds, simulate

    rng = np.random.default_rng(0)
    n = 400
    teacher = rng.integers(0, 4, n)
    # exit 0: right and confident on the first half, a coin toss elsewhere
    p0 = np.full((n, 4), 0.25)
    p0[np.arange(200), teacher[:200]] = 0.97
    p0[200:] = rng.dirichlet(np.ones(4), 200)
    thr = pick_thresholds([p0], teacher, [0.2], agreement=0.99)
    sim = simulate([p0], np.eye(4)[teacher], thr, [0.2])
    assert (sim["label"] == teacher).mean() >= 0.99
    assert sim["compute_saved"] >= 0.8 * 0.5 * 0.8
    assert pick_thresholds([p0], teacher, [0.2], agreement=1.01) == [1.0]
