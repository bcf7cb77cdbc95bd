"""The Updater and the rollback command on a recording context, real store and real gate (issue 15)."""
from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest

from agent.core.context import CommandError
from agent.serving.feature import Serving
from agent.updates.feature import Updater
from protocol.chunks import make_manifest
from protocol.envelope import Envelope
from protocol.mqttlink import Message
from protocol.patch import bundle_id, make_patch
from protocol.signing import generate, save_keypair

from .fake_context import FakeContext


def variant(src, out, version, transform):
    from controller.modeltools.example import derive_bundle
    from protocol.bundle import load_head

    return derive_bundle(src, out, version, transform(load_head(src / "head.npz")))


@pytest.fixture(scope="module")
def versions(tmp_path_factory, example_bundle):
    d = tmp_path_factory.mktemp("versions")
    v1 = example_bundle[0]
    v2 = variant(v1, d / "v2", "1.1.0", lambda h: {k: v * 1.01 for k, v in h.items()})
    bad = variant(v1, d / "bad", "1.2.0", lambda h: {k: np.roll(v, 3, axis=-1) for k, v in h.items()})
    return v1, v2, bad


@pytest.fixture
def board(tmp_path, versions):
    key = generate()
    save_keypair(key, tmp_path / "k.pem", tmp_path / "k.pub")
    ctx = FakeContext(state={"dir": str(tmp_path / "state")}, model={"bundle": str(versions[0])},
                      security={"trusted_keys": [str(tmp_path / "k.pub")]})
    serving = Serving(ctx, runtimes=["onnxruntime"])
    serving.start()
    up = Updater(ctx, serving)
    return ctx, serving, up, key


def offer_body(target, data=b"x" * 100, base=None, **extra):
    from protocol.patch import read_manifest

    return {"rollout_id": None, "target": {"version": read_manifest(target)["version"],
                                           "bundle_sha256": bundle_id(target)},
            "base": base, "transfer": make_manifest(f"t-{bundle_id(target)[:8]}", data, 65536).to_dict(), **extra}


def offer_msg(body):
    env = Envelope(kind="model.offer", sender="controller", body=body)
    return env, Message("edgefleet/v1/dev/pi-t/cmd", b"")


def updates(ctx):
    return [(e["status"], e.get("reason", "")) for e in ctx.named("model.update")]


def test_a_kept_older_version_offered_without_allow_downgrade_is_refused(board, versions):
    ctx, serving, up, key = board
    v1, v2, _ = versions
    assert serving.store.apply_patch(make_patch(v1, v2, key)[0], up.trusted).ok
    serving.load_current()
    asyncio.run(up.on_offer(*offer_msg(offer_body(v1))))
    assert bundle_id(serving.store.current) == bundle_id(v2)
    assert updates(ctx)[-1][0] == "failed" and "not newer" in updates(ctx)[-1][1], updates(ctx)
    # the controller's own rollback offer carries allow_downgrade (signed): switched, through the gate
    asyncio.run(up.on_offer(*offer_msg(offer_body(v1, allow_downgrade=True))))
    assert bundle_id(serving.store.current) == bundle_id(v1) and serving.model_info()["version"] == "1.0.0"
    status, _ = updates(ctx)[-1]
    assert status == "applied"


def test_rollback_command_gates_the_target_before_switching(board, versions):
    ctx, serving, up, key = board
    v1, _, bad = versions
    # a version dir that an older agent renamed in before its gate (the bypass of item 5)
    shutil.copytree(bad, serving.store.root / f"v-{bundle_id(bad)[:16]}")
    with pytest.raises(CommandError, match="health check failed"):
        asyncio.run(_call(serving._cmd_rollback({"bundle_sha256": bundle_id(bad)},
                                                Envelope(kind="cmd", sender="ops", body={}))))
    assert bundle_id(serving.store.current) == bundle_id(v1)
    assert serving.model_info()["version"] == "1.0.0"


async def _call(result):
    if asyncio.iscoroutine(result):
        return await result
    return result


def test_a_complete_part_file_is_applied_at_start(tmp_path, board, versions):
    ctx, serving, up, key = board
    v1, v2, _ = versions
    data, _ = make_patch(v1, v2, key)
    body = offer_body(v2, data, base={"version": "1.0.0", "bundle_sha256": bundle_id(v1)})
    d = tmp_path / "state" / "transfers" / body["transfer"]["transfer_id"]
    d.mkdir(parents=True)
    (d / "offer.json").write_text(json.dumps(body))
    (d / "patch.part").write_bytes(data)            # every chunk arrived, then the agent died

    restarted = Updater(ctx, serving)
    restarted.start()
    assert restarted.active is not None and restarted.active.transfer.complete

    async def main():
        task = asyncio.create_task(restarted.run())
        try:
            for _ in range(600):
                if restarted.active is None:
                    return
                await asyncio.sleep(0.05)
        finally:
            task.cancel()

    asyncio.run(main())
    assert bundle_id(serving.store.current) == bundle_id(v2)
    assert [s for s, _ in updates(ctx)][-5:] == ["received", "verified", "staged", "healthy", "applied"]
    assert not ctx.on("/data/xfer")                  # nothing asked for, no new offer needed
    assert not d.exists()
