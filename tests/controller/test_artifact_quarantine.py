"""Content-addressed artifacts, the rollout's own artifact, and quarantine (issue 15, item 4): pure and
store-level; tests/integration/test_rollout_quarantine.py runs it on real processes."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from controller.rollouts.policy import is_integrity_refusal


def write_bundle(d: Path, version: str, seed: int, backbone: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "backbone.onnx").write_bytes(backbone)
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    np.savez(buf, **{"dense0.bias": rng.normal(size=10).astype(np.float32)})
    (d / "head.npz").write_bytes(buf.getvalue())
    files = {n: {"sha256": hashlib.sha256((d / n).read_bytes()).hexdigest(), "size": (d / n).stat().st_size}
             for n in ("backbone.onnx", "head.npz")}
    (d / "manifest.json").write_text(json.dumps({"name": "digits", "version": version, "files": files}))
    return d


@pytest.fixture
def bundles(tmp_path):
    from protocol.signing import generate

    bb = os.urandom(4000)
    return generate(), write_bundle(tmp_path / "v1", "1.0.0", 1, bb), write_bundle(tmp_path / "v2", "1.1.0", 2, bb)


def _flip(b: bytes) -> bytes:
    x = bytearray(b)
    x[-3] ^= 0xFF
    return bytes(x)


def test_the_boards_own_reasons_are_classified(tmp_path, bundles):
    """The reasons come from the agent's real ModelStore, so the list cannot drift from its messages."""
    from agent.updates.modelstore import ModelStore
    from protocol.patch import make_patch
    from protocol.signing import generate

    key, v1, v2 = bundles
    good, _ = make_patch(v1, v2, key)
    cases = {"tampered_manifest": (good.replace(b'"1.1.0"', b'"9.9.9"', 1), True),
             "payload_flip": (_flip(good), True),
             "truncated": (good[:20], True),
             "not_a_patch": (b"GARBAGE" * 10, True),
             "unknown_key": (make_patch(v1, v2, generate())[0], False),       # the board's trust, not the bytes
             "wrong_base": (make_patch(v2, v1, key)[0], False)}
    for case, (data, integrity) in cases.items():
        store = ModelStore(tmp_path / f"s-{case}")
        assert store.install_bundle_dir(v1).ok
        res = store.apply_patch(data, [key.public_key()])
        assert not res.ok
        assert is_integrity_refusal(res.reason) is integrity, (case, res.reason)
    for reason in (None, "", "rolled back: health check failed: x", "refused: already installed",
                   "refused: version 1.0 is not newer than the installed 1.1 (replay or downgrade)",
                   "transfer corrupt: chunk 3", "not enough disk: 10 bytes free"):
        assert not is_integrity_refusal(reason), reason


def _runner(tmp_path, key):
    from controller.config import parse_config
    from controller.registry import Registry
    from controller.rollouts.runner import RolloutRunner
    from controller.rollouts.store import RolloutStore

    reg = Registry(tmp_path / "r.db")
    store = RolloutStore(reg.db, tmp_path / "artifacts")
    channel = SimpleNamespace(key=key)
    return RolloutRunner(channel, reg, store, parse_config({}), lambda *a: None), store  # type: ignore[arg-type]


def test_artifacts_are_content_addressed_and_a_quarantine_sticks(tmp_path, bundles):
    from protocol.patch import make_patch

    key, v1, v2 = bundles
    _, store = _runner(tmp_path, key)
    good, _ = make_patch(v1, v2, key)
    bad = store.add_patch(_flip(good))
    genuine = store.add_patch(good)
    assert bad.id == hashlib.sha256(_flip(good)).hexdigest() and genuine.id == hashlib.sha256(good).hexdigest()
    assert bad.bundle_sha256 == genuine.bundle_sha256          # same target, two artifacts
    assert store.quarantine(bad.id, "q1: refused: payload hash") and not store.quarantine(bad.id, "again")
    again = store.add_patch(_flip(good))                         # the same bytes once more: still quarantined
    assert again.quarantined is not None and not again.usable and again.quarantine_reason == "q1: refused: payload hash"
    assert [a.id for a in store.quarantined_for(bad.bundle_sha256)] == [bad.id]
    assert store.artifact_by_version("1.1.0").id == genuine.id


def test_a_rollout_uses_its_own_artifact_and_never_a_quarantined_one(tmp_path, bundles, monkeypatch):
    import itertools

    import protocol.patch
    from protocol.patch import bundle_id, make_patch

    ticks = itertools.count(1_700_000_000)       # every patch made gets its own timestamp, hence its own bytes
    monkeypatch.setattr(protocol.patch, "time", SimpleNamespace(time=lambda: float(next(ticks))))

    key, v1, v2 = bundles
    runner, store = _runner(tmp_path, key)
    a, b = bundle_id(v1), bundle_id(v2)
    first, _ = make_patch(v1, v2, key)
    bad = store.add_patch(_flip(first))
    other = store.add_patch(make_patch(v1, v2, key)[0])
    assert bad.id != other.id
    # a patch rollout ships its own patch, whatever else is stored for the same versions
    assert runner.pick_artifact(a, b, bad.id)[0].id == bad.id
    assert runner.pick_artifact(a, b, other.id)[0].id == other.id
    store.quarantine(bad.id, "refused: payload hash")
    # its own artifact quarantined: no other uploaded patch stands in for it, and the reason says why
    art, why = runner.pick_artifact(a, b, bad.id)
    assert art is None and "quarantined" in why and "payload hash" in why
    # a rollout without an artifact of its own (a rollback) may use any usable one, never the quarantined
    assert runner.pick_artifact(a, b, None)[0].id == other.id
    store.quarantine(other.id, "refused: bad signature")
    assert runner.pick_artifact(a, b, None) == (None, "")
    # a bundle rollout: the controller makes the patch from the stored bundles, once, and reuses it
    store.add_bundle(v1)
    own = store.add_bundle(v2)
    made, _ = runner.pick_artifact(a, b, own.id)
    assert made.made_from == own.id and made.base_sha256 == a and made.id not in (bad.id, other.id)
    assert runner.pick_artifact(a, b, own.id)[0].id == made.id and runner.counts["patches_made"] == 1
    # ... and when the patch it made is quarantined, it makes a new one
    store.quarantine(made.id, "refused: payload hash")
    remade, _ = runner.pick_artifact(a, b, own.id)
    assert remade.id != made.id and remade.usable and runner.counts["patches_made"] == 2
    # the quarantined bad patch's own rollout may now go through the controller's own patch
    assert runner.pick_artifact(a, b, bad.id)[0].id == remade.id
