"""Patch size benchmark: a head-only change shipped as a signed patch vs the full bundle.

For the example digits bundle and for a bundle with a realistic-size int8 backbone (35 M
parameters), retrain only the head (a new version, as on-device learning or a federated round
produces) and compare the patch (``protocol.patch.make_patch``: only changed files, zstd,
Ed25519-signed) with the full bundle shipped as a patch against nothing.
``rollout_50_seconds`` needs the rollout machinery (issue 6, not built yet) and is reported as null.
Never fails on a number; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.disable(logging.WARNING)

from controller.modeltools.example import build_example  # noqa: E402
from controller.modeltools.mlp import init_mlp  # noqa: E402
from controller.modeltools.onnx_export import dense_to_onnx, quantize_static_int8  # noqa: E402
from protocol.bundle import head_bytes, load_bundle, write_manifest  # noqa: E402
from protocol.patch import make_patch  # noqa: E402
from protocol.signing import generate  # noqa: E402


def new_head_version(src: Path, dst: Path, version: str, rng) -> Path:
    shutil.copytree(src, dst)
    b = load_bundle(dst)
    head = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in b.head.items()}
    (dst / "head.npz").write_bytes(head_bytes(head))
    m = json.loads((dst / "manifest.json").read_text())
    m["version"], m["parent_version"] = version, m["version"]
    write_manifest(dst, m)
    return dst


def sizes(old: Path, new: Path, key) -> tuple[int, int, float]:
    t = time.perf_counter()
    patch, _ = make_patch(old, new, key)
    ms = (time.perf_counter() - t) * 1000
    full, _ = make_patch(None, new, key)
    return len(patch), len(full), ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    key = generate()
    work = Path(tempfile.mkdtemp(prefix="edgefleet-patch-"))
    build_example(work / "v1", "small", epochs=20 if a.quick else 40)
    new_head_version(work / "v1", work / "v2", "1.0.1", rng)
    p, f, ms = sizes(work / "v1", work / "v2", key)
    print(f"example bundle: head-only patch {p} B vs full bundle {f} B ({p / f:.2%}), made in {ms:.1f} ms")
    fig = {"head_patch_bytes": p, "full_bundle_bytes": f, "head_patch_fraction": round(p / f, 5)}

    width = 2048 if a.quick else 3392
    big = work / "big1"
    shutil.copytree(work / "v1", big)
    layers = init_mlp([64, width, width, width, width, 64], rng)
    dense_to_onnx(layers, work / "big_fp32.onnx", 64, relu_last=True)
    quantize_static_int8(work / "big_fp32.onnx", big / "backbone.onnx", rng.uniform(0, 16, (32, 64)).astype(np.float32))
    m = json.loads((big / "manifest.json").read_text())
    write_manifest(big, m)
    new_head_version(big, work / "big2", "1.0.1", rng)
    p2, f2, ms2 = sizes(big, work / "big2", key)
    print(f"realistic backbone (64-{width}x4-64 int8): head-only patch {p2} B vs full bundle {f2 / 2**20:.1f} MB "
          f"({p2 / f2:.4%}), made in {ms2:.0f} ms")
    fig.update(realistic_head_patch_bytes=p2, realistic_full_bundle_bytes=f2,
               realistic_head_patch_fraction=round(p2 / f2, 6), backbone_width=width, rollout_50_seconds=None)
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
