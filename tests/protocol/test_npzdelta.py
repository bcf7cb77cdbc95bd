"""Patches of chosen layers (issue 20): a head whose trainable layers changed travels as those
tensors only; the board rebuilds the file bit for bit and checks it against the signed manifest."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from protocol.bundle import head_bytes
from protocol.npzdelta import DeltaError, apply_delta, make_delta, npz_bytes, read_npz
from protocol.patch import FORMAT, FORMAT_DELTA, PatchError, make_patch, parse_patch, verify_patch


def _head(seed=0, hidden=64):
    rng = np.random.default_rng(seed)
    return {"dense0.weight": rng.normal(size=(64, hidden)).astype(np.float32),
            "dense0.bias": rng.normal(size=hidden).astype(np.float32),
            "dense1.weight": rng.normal(size=(hidden, 10)).astype(np.float32),
            "dense1.bias": rng.normal(size=10).astype(np.float32)}


def _bundle(d, version, head, src):
    """``src`` (the example bundle) with this head: derive_bundle, as a finished run's result is made."""
    from controller.modeltools.example import derive_bundle

    return derive_bundle(src, d, version, head)


def _two_layer_base(src, d):
    """The example bundle with a two-layer head that federates ``dense1`` only and keeps the trained
    head's predictions (so it passes the bundle's health gate): dense0 = [I, -I], dense1 = [W; -W],
    since relu(x)·W + relu(-x)·(-W) = x·W."""
    from protocol.bundle import load_head, write_manifest

    one = load_head(src / "head.npz")
    w, b = one["dense0.weight"].astype(np.float64), one["dense0.bias"]
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(w.shape[0], w.shape[0])))   # a dense body
    head = {"dense0.weight": np.concatenate([q, -q], 1).astype(np.float32),
            "dense0.bias": np.zeros(2 * w.shape[0], np.float32),
            "dense1.weight": np.concatenate([q.T @ w, -(q.T @ w)], 0).astype(np.float32),
            "dense1.bias": b.astype(np.float32)}
    _bundle(d, "1.0.1", head, src)
    m = json.loads((d / "manifest.json").read_text())
    m["trainable"] = ["dense1"]
    write_manifest(d, m)
    return d, head


def test_npz_bytes_are_canonical_and_loadable():
    h = _head()
    a, b = npz_bytes(h), npz_bytes({k: v.copy() for k, v in h.items()})
    assert a == b
    back = read_npz(a)
    assert list(back) == list(h) and all(np.array_equal(back[k], h[k]) for k in h)


def test_delta_carries_only_the_changed_tensors_and_rebuilds_the_same_bytes():
    old = _head()
    new = {**old, "dense1.weight": old["dense1.weight"] + 1, "dense1.bias": old["dense1.bias"] - 1}
    ob, nb = head_bytes(old), head_bytes(new)
    blob, info = make_delta(ob, nb)
    assert info["changed"] == ["dense1.weight", "dense1.bias"]
    assert len(blob) < len(nb) / 5                    # dense0 (64x64) stays on the board
    assert apply_delta(ob, blob, info) == nb


def test_delta_refuses_another_base_a_tampered_blob_and_bad_entries():
    old = _head()
    new = {**old, "dense1.bias": old["dense1.bias"] + 1}
    ob, nb = head_bytes(old), head_bytes(new)
    blob, info = make_delta(ob, nb)
    with pytest.raises(DeltaError, match="not the one the delta was made against"):
        apply_delta(head_bytes(_head(seed=1)), blob, info)
    with pytest.raises(DeltaError, match="SHA-256 mismatch"):
        apply_delta(ob, blob[:-1] + bytes([blob[-1] ^ 1]), info)
    with pytest.raises(DeltaError, match="unsupported delta format"):
        apply_delta(ob, blob, {**info, "format": "x"})
    with pytest.raises(DeltaError, match="changed within order"):
        apply_delta(ob, blob, {**info, "changed": ["nope"]})


def test_no_delta_where_it_cannot_help_or_cannot_be_rebuilt():
    old = _head()
    assert make_delta(head_bytes(old), head_bytes(_head(seed=3))) is None      # every tensor changed
    import io

    buf = io.BytesIO()
    np.savez(buf, **{**old, "dense1.bias": old["dense1.bias"] + 1})         # not canonical
    assert make_delta(head_bytes(old), buf.getvalue()) is None
    assert make_delta(b"junk", head_bytes(old)) is None


def test_patch_of_federated_layers_ships_those_layers_and_verifies(tmp_path, example_bundle):
    """A result over the last layer only (the example head has two): the patch carries that layer
    and the new reference probabilities, the board rebuilds both files bit for bit."""
    key = Ed25519PrivateKey.generate()
    a, old = _two_layer_base(example_bundle[0], tmp_path / "a")
    last = "dense1"
    new = {k: (v * 0.5 + 0.01 if k.startswith(last + ".") else v) for k, v in old.items()}
    b = _bundle(tmp_path / "b", "1.1.0", new, a)
    data, pm = make_patch(a, b, key)
    whole, pm_whole = make_patch(a, b, key, deltas=False)
    assert pm["format"] == FORMAT_DELTA and pm_whole["format"] == FORMAT
    assert sorted(pm["files"]["head.npz"]["delta"]["changed"]) == [f"{last}.bias", f"{last}.weight"]
    assert pm["files"]["reference.npz"]["delta"]["changed"] == ["probs"]
    assert len(data) * 2 < len(whole), (len(data), len(whole))     # the bytes, measured
    vp = verify_patch(data, [key.public_key()], a)
    m = json.loads((b / "manifest.json").read_text())
    for n in ("head.npz", "reference.npz"):
        assert vp.files[n] == (b / n).read_bytes()
        assert hashlib.sha256(vp.files[n]).hexdigest() == m["files"][n]["sha256"]


def test_a_delta_patch_needs_the_installed_file_it_was_made_against(tmp_path, example_bundle):
    """A board whose head.npz was damaged after install passes the bundle check (the manifest is
    intact), and the delta's own check refuses, naming the file; with no installed file, too."""
    import zstandard

    from protocol.patch import _rebuild

    key = Ed25519PrivateKey.generate()
    a, old = _two_layer_base(example_bundle[0], tmp_path / "a")
    b = _bundle(tmp_path / "b", "1.1.0", {**old, "dense1.bias": old["dense1.bias"] + 1}, a)
    data, pm = make_patch(a, b, key)
    raw = zstandard.ZstdDecompressor().decompress(parse_patch(data)[1], max_output_size=pm["payload"]["raw_size"])
    info = pm["files"]["head.npz"]
    blob = raw[info["offset"]:info["offset"] + info["size"]]
    assert _rebuild("head.npz", blob, info["delta"], a) == (b / "head.npz").read_bytes()
    (a / "head.npz").write_bytes(head_bytes({k: v + 2 for k, v in old.items()}))
    with pytest.raises(PatchError, match="head.npz: the installed file is not the one"):
        _rebuild("head.npz", blob, info["delta"], a)
    with pytest.raises(PatchError, match="no installed head.npz"):
        _rebuild("head.npz", blob, info["delta"], tmp_path / "empty")
    # the bundle's id is its manifest's hash, unchanged by a damaged file: verify_patch refuses by the file
    with pytest.raises(PatchError, match="head.npz: the installed file is not the one"):
        verify_patch(data, [key.public_key()], a)
