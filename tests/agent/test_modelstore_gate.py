"""Stage → check → commit, and every switch behind the downgrade rule and the gate (issue 15, items 3 and 5)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.updates import modelstore
from agent.updates.modelstore import ModelStore
from protocol.patch import bundle_id, make_patch
from protocol.signing import save_keypair

from tests.agent.test_modelstore import ROOT, env, write_bundle  # noqa: F401 - the fixture


def test_the_gate_runs_on_the_staging_directory_and_the_version_is_invisible_meanwhile(env):
    key, v1, v2, store, _ = env
    patch, _ = make_patch(v1, v2, key)
    seen = {}

    def health(d: Path) -> dict:
        seen["dir"] = d.name
        seen["find_id"] = store.find_id(bundle_id(v2))
        seen["versions"] = [p.name for p in store.versions()]
        return {"ok": 1}

    res = store.apply_patch(patch, [key.public_key()], health=health)
    assert res.ok, res.reason
    assert seen["dir"].startswith(".staging-"), seen
    assert seen["find_id"] is None and seen["versions"] == [f"v-{bundle_id(v1)[:16]}"], seen
    assert res.steps == ("received", "verified", "staged", "healthy", "applied")
    assert store.find_id(bundle_id(v2)) == store.current


def test_a_refused_version_leaves_nothing_behind(env):
    key, v1, v2, store, _ = env

    def health(d: Path) -> None:
        raise RuntimeError("shadow evaluation: 12% vs 97%")

    res = store.apply_patch(make_patch(v1, v2, key)[0], [key.public_key()], health=health)
    assert not res.ok and "unhealthy" in res.steps
    assert store.find_id(bundle_id(v2)) is None and not list(store.root.glob(".staging-*"))


GATED_KILLER = """
import sys, time
from pathlib import Path
from agent.updates.modelstore import ModelStore
from protocol.signing import load_public
store = ModelStore(sys.argv[1])
def health(d):
    if sys.argv[4] == "bad":
        raise RuntimeError("refused by the gate")
    return {}
print(store.apply_patch(Path(sys.argv[2]).read_bytes(), [load_public(sys.argv[3])], health=health).reason)
"""


@pytest.mark.parametrize("verdict", ["good", "bad"])
def test_sigkill_at_every_install_failpoint_never_leaves_an_ungated_version(env, verdict):
    key, v1, v2, store, tmp = env
    save_keypair(key, tmp / "k.pem", tmp / "k.pub")
    patch, _ = make_patch(v1, v2, key)
    (tmp / "p.efp").write_bytes(patch)
    assert "gate" in modelstore.INSTALL_FAILPOINTS
    for point in modelstore.INSTALL_FAILPOINTS:
        p = subprocess.run([sys.executable, "-c", GATED_KILLER, str(store.root), str(tmp / "p.efp"),
                            str(tmp / "k.pub"), verdict],
                           env={**os.environ, "EDGEFLEET_FAILPOINT": point, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=60)
        restarted = ModelStore(store.root)
        restarted.recover()
        cur = restarted.current
        assert cur is not None and restarted.valid(cur), point
        visible = restarted.find_id(bundle_id(v2))
        if verdict == "bad":
            # never killed after the gate (the gate refused first), never visible
            assert bundle_id(cur) == bundle_id(v1) and visible is None, (point, p.returncode, p.stdout)
        else:
            assert bundle_id(cur) in (bundle_id(v1), bundle_id(v2)), point
            if point in ("staging", "staged", "gate", "healthy"):
                assert bundle_id(cur) == bundle_id(v1) and visible is None, point
        assert not list(restarted.root.glob(".staging-*")), point
        # back to v1 for the next point (an operator rollback: allowed downgrade, still gated)
        if bundle_id(cur) != bundle_id(v1):
            res = restarted.switch(restarted.find_id(bundle_id(v1)), health=lambda d: {}, allow_downgrade=True)
            assert res.ok, res.reason
        if visible is not None:
            import shutil
            shutil.rmtree(visible)


def test_switch_keeps_the_downgrade_rule_and_the_gate(env):
    key, v1, v2, store, _ = env
    assert store.apply_patch(make_patch(v1, v2, key)[0], [key.public_key()]).ok
    old = store.find_id(bundle_id(v1))
    res = store.switch(old)
    assert not res.ok and "not newer" in res.reason and bundle_id(store.current) == bundle_id(v2)

    def refuse(d: Path) -> None:
        raise RuntimeError("does not load")

    res = store.switch(old, health=refuse, allow_downgrade=True)
    assert not res.ok and "health check failed: does not load" in res.reason and "unhealthy" in res.steps
    assert bundle_id(store.current) == bundle_id(v2) and store.find_id(bundle_id(v1)) == old   # kept
    checked = []
    res = store.switch(old, health=lambda d: checked.append(d) or {"eval_accuracy": 0.9}, allow_downgrade=True)
    assert res.ok and checked == [old] and res.health == {"eval_accuracy": 0.9}
    assert bundle_id(store.current) == bundle_id(v1) and bundle_id(store.previous) == bundle_id(v2)
    assert res.steps == ("healthy", "applied")
    # forward again to a kept newer version: no downgrade flag needed, the gate still runs
    checked.clear()
    assert store.switch(store.find_id(bundle_id(v2)), health=lambda d: checked.append(d) or {}).ok
    assert len(checked) == 1
    assert not store.switch(store.current, health=lambda d: {}).ok   # already serving it
