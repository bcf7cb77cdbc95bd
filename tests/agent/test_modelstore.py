"""Signed patches into the A/B model store: every refusal, rollback, and SIGKILL at each step."""
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.updates.modelstore import ModelStore
from protocol.patch import PatchError, bundle_id, make_patch, parse_patch, verify_patch
from protocol.signing import generate, save_keypair

ROOT = Path(__file__).resolve().parents[2]


def write_bundle(d: Path, version: str, head_seed: int, backbone: bytes) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "backbone.onnx").write_bytes(backbone)
    rng = np.random.default_rng(head_seed)
    buf = io.BytesIO()
    np.savez(buf, **{"dense0.weight": rng.normal(size=(32, 10)).astype(np.float32),
                     "dense0.bias": rng.normal(size=10).astype(np.float32)})
    (d / "head.npz").write_bytes(buf.getvalue())
    files = {n: {"sha256": hashlib.sha256((d / n).read_bytes()).hexdigest(), "size": (d / n).stat().st_size}
             for n in ("backbone.onnx", "head.npz")}
    (d / "manifest.json").write_text(json.dumps({"name": "digits", "version": version, "files": files}))
    return d


@pytest.fixture
def env(tmp_path):
    key = generate()
    backbone = os.urandom(300_000)
    v1 = write_bundle(tmp_path / "b1", "1.0.0", 1, backbone)
    v2 = write_bundle(tmp_path / "b2", "1.1.0", 2, backbone)  # head-only change
    store = ModelStore(tmp_path / "state" / "models")
    assert store.install_bundle_dir(v1).ok
    return key, v1, v2, store, tmp_path


def test_head_only_patch_is_small_and_applies(env):
    key, v1, v2, store, _ = env
    full, _ = make_patch(None, v2, key)
    patch, pm = make_patch(v1, v2, key)
    assert sorted(pm["files"]) == ["head.npz", "manifest.json"] and pm["unchanged"] == ["backbone.onnx"]
    assert len(patch) < 0.05 * len(full)
    res = store.apply_patch(patch, [key.public_key()])
    assert res.ok, res.reason
    assert res.steps == ("received", "verified", "staged", "applied")
    assert bundle_id(store.current) == bundle_id(v2)
    assert (store.current / "backbone.onnx").read_bytes() == (v1 / "backbone.onnx").read_bytes()
    assert store.previous is not None and bundle_id(store.previous) == bundle_id(v1)
    back = store.rollback()
    assert back.ok and bundle_id(store.current) == bundle_id(v1)


def corrupt_payload(p: bytes) -> bytes:
    b = bytearray(p)
    b[-3] ^= 0xFF
    return bytes(b)


@pytest.mark.parametrize("case,reason", [
    ("unknown_key", "not trusted"),
    ("tampered_manifest", "bad signature"),
    ("payload_flip", "payload hash"),
    ("truncated", "truncated"),
    ("not_a_patch", "not an edgefleet patch"),
    ("wrong_base", "wrong base"),
    ("replay_older", "not newer"),
    ("already", "already installed"),
])
def test_bad_patches_refused_and_serving_model_unchanged(env, case, reason):
    key, v1, v2, store, tmp = env
    trusted = [key.public_key()]
    patch, _ = make_patch(v1, v2, key)
    if case == "unknown_key":
        patch, _ = make_patch(v1, v2, generate())
    elif case == "tampered_manifest":
        patch = patch.replace(b'"1.1.0"', b'"9.9.9"', 1)
    elif case == "payload_flip":
        patch = corrupt_payload(patch)
    elif case == "truncated":
        patch = patch[:20]
    elif case == "not_a_patch":
        patch = b"GARBAGE" * 10
    elif case == "wrong_base":
        v3 = write_bundle(tmp / "b3", "1.2.0", 3, os.urandom(1000))
        patch, _ = make_patch(v3, v2, key)
    elif case == "replay_older":
        assert store.apply_patch(patch, trusted).ok
        v0 = write_bundle(tmp / "b0", "0.9.0", 0, (v1 / "backbone.onnx").read_bytes())
        patch, _ = make_patch(v2, v0, key)
    elif case == "already":
        assert store.apply_patch(patch, trusted).ok
        patch, _ = make_patch(v1, v2, key)
        store.rollback()
        store.rollback()  # back to v2 (current), patch names base v1 → wrong base; use full patch instead
        patch, _ = make_patch(None, v2, key)
    before = store.current
    res = store.apply_patch(patch, trusted)
    assert not res.ok and reason in res.reason, res.reason
    assert store.current == before and store.valid(store.current)
    assert not list(store.root.glob(".staging-*"))


def test_unhealthy_bundle_rolls_back_by_itself(env):
    key, v1, v2, store, _ = env
    patch, _ = make_patch(v1, v2, key)

    def health(d: Path) -> None:
        raise RuntimeError("reference accuracy 0.12 < 0.90")

    res = store.apply_patch(patch, [key.public_key()], health=health)
    assert not res.ok and "health check failed: reference accuracy" in res.reason
    assert res.steps[-1] == "unhealthy"
    assert bundle_id(store.current) == bundle_id(v1)
    assert len(store.versions()) == 1


KILLER = """
import sys
from pathlib import Path
from agent.updates.modelstore import ModelStore
from protocol.signing import load_public
store = ModelStore(sys.argv[1])
store.apply_patch(Path(sys.argv[2]).read_bytes(), [load_public(sys.argv[3])])
print("finished")
"""


@pytest.mark.parametrize("point", ["staging", "staged", "renamed", "before_switch", "switched"])
def test_sigkill_at_any_step_leaves_old_or_new_never_neither(env, point):
    key, v1, v2, store, tmp = env
    save_keypair(key, tmp / "k.pem", tmp / "k.pub")
    patch, _ = make_patch(v1, v2, key)
    (tmp / "p.efp").write_bytes(patch)
    p = subprocess.run([sys.executable, "-c", KILLER, str(store.root), str(tmp / "p.efp"), str(tmp / "k.pub")],
                       env={**os.environ, "EDGEFLEET_FAILPOINT": point, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == -9, p.stderr
    restarted = ModelStore(store.root)
    restarted.recover()
    cur = restarted.current
    assert cur is not None and restarted.valid(cur)
    assert bundle_id(cur) in (bundle_id(v1), bundle_id(v2))
    if point == "switched":
        assert bundle_id(cur) == bundle_id(v2)
    if point in ("staging", "staged"):
        assert bundle_id(cur) == bundle_id(v1)
    assert not list(restarted.root.glob(".staging-*"))
    # and the interrupted install can simply be retried
    res = restarted.apply_patch(patch, [key.public_key()])
    assert res.ok or "already installed" in res.reason
    assert bundle_id(restarted.current) == bundle_id(v2)


def test_recover_repairs_a_dangling_pointer(env):
    key, v1, v2, store, _ = env
    assert store.apply_patch(make_patch(v1, v2, key)[0], [key.public_key()]).ok
    import shutil
    shutil.rmtree(store.current)  # disk damage: current version gone
    notes = store.recover()
    assert notes and bundle_id(store.current) == bundle_id(v1)


def test_parse_patch_refuses_junk():
    for junk in (b"", b"EFP1", b"EFP1\xff\xff\xff\xff{}", b"EFP1\x02\x00\x00\x00{}"):
        with pytest.raises(PatchError):
            pm, _ = parse_patch(junk)
            verify_patch(junk, [], None)
