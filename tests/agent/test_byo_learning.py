"""An imported model cut at its feature layer, with a head for another label set (3 classes over
an exporter's 5), takes part in everything heads do: on-device fine-tuning, federated local
training, and a signed head patch installed by the real model store behind the health gate."""
from __future__ import annotations

import json
import shutil

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.learning.learner import LearnConfig, Learner
from agent.serving.health import check_bundle
from agent.serving.inference import InferenceEngine
from agent.updates.modelstore import ModelStore
from controller.modeltools.importer import ImportOptions, import_model
from protocol.bundle import load_bundle, save_head_atomic, write_manifest
from protocol.patch import make_patch
from tests.controller.test_model_import import exporter_graph


def test_imported_cut_model_fine_tunes_federates_and_takes_a_head_patch(tmp_path):
    src = exporter_graph(tmp_path / "m.onnx", classes=5)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (90, 1, 8, 8)).astype(np.float32)
    x[:, :, :4] *= np.repeat(np.arange(90) % 3, 1)[:, None, None, None] + 1  # the class shows in the image
    y = np.arange(90) % 3
    np.savez(tmp_path / "eval.npz", x=x[:30], y=y[:30])
    rep = import_model(src, tmp_path / "a", ImportOptions("byo", cut="auto", input_shapes={"": [1, 1, 8, 8]},
                                                          labels=["a", "b", "c"], eval=str(tmp_path / "eval.npz"),
                                                          quantize=False))
    assert rep.head["fitted"] and rep.head["classes"] == 3
    eng = InferenceEngine(load_bundle(tmp_path / "a"))
    assert eng.head["dense0.weight"].shape == (8, 3)

    # on-device fine-tuning over the served features
    learner = Learner(eng.head, 3, LearnConfig(isolate="thread", min_train=10, min_holdout=5, max_steps=200,
                                               budget_s=10, cpu_fraction=1.0), tmp_path / "learn", "bid")
    for i, xi in enumerate(x):
        p = eng.predict(xi)
        assert learner.observe(f"s{i}", p.features.reshape(-1), p.confidence, p.entropy, int(y[i]), 0.0) is None
    cycle = learner.run_cycle()
    assert cycle.steps > 0 and cycle.reason, cycle
    local = learner.train_from(eng.head, steps=20, lr=0.05, batch_size=16, prox_mu=0.0, optimizer="sgd", budget_s=10)
    assert {k: v.shape for k, v in local.head.items()} == {k: v.shape for k, v in eng.head.items()}

    # a head patch A → B (only head.npz changes), installed by the model store behind the health gate
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    new_head = {k: np.asarray(v) for k, v in local.head.items()}
    save_head_atomic(tmp_path / "b" / "head.npz", new_head)
    man = json.loads((tmp_path / "b" / "manifest.json").read_text())
    man.update(version="1.0.1", parent_version="1.0.0")
    man.pop("eval", None)
    man["files"].pop("eval.npz", None)
    man.pop("reference", None)
    man["files"].pop("reference.npz", None)
    write_manifest(tmp_path / "b", man)
    key = Ed25519PrivateKey.generate()
    data, _ = make_patch(tmp_path / "a", tmp_path / "b", key)
    store = ModelStore(tmp_path / "store")
    health = lambda p: check_bundle(p)  # noqa: E731
    assert store.install_bundle_dir(tmp_path / "a", health=health).ok
    res = store.apply_patch(data, [key.public_key()], health=health)
    assert res.ok, res.reason
    served = InferenceEngine(load_bundle(store.current))
    assert served.bundle.manifest.version == "1.0.1"
    np.testing.assert_allclose(served.head["dense0.weight"], new_head["dense0.weight"], rtol=1e-6)
