"""Inference benchmark: the agent's path vs raw ONNX Runtime, int8 vs fp32, LiteRT vs ONNX Runtime.

Figures (all measured in this run; never fails on a number; last line is one JSON object):
* overhead_ratio / overhead_us: ``InferenceEngine.predict`` (validation, runtime call,
  softmax, metrics) vs a bare ``InferenceSession.run`` on the same int8 graph, batch 1, on a
  backbone widened until its raw inference takes >= 1 ms here. Timings interleave the two
  paths in blocks so drift on a shared machine hits both alike.
* int8_size_ratio / int8_accuracy_drop_pts: the example digits bundle (trained here) and the
  realistic-size backbone (size only).
* litert_vs_ort_latency_ratio: the committed float digits .tflite vs an ONNX graph built
  from the very same weights (outputs checked equal), both single-threaded.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.disable(logging.WARNING)

from agent.serving.inference import InferenceEngine  # noqa: E402
from agent.serving.runtimes import LiteRtRuntime, OnnxRuntime  # noqa: E402
from controller.modeltools.example import build_example, digits_split  # noqa: E402
from controller.modeltools.mlp import init_mlp  # noqa: E402
from controller.modeltools.onnx_export import dense_to_onnx, quantize_static_int8  # noqa: E402
from protocol.bundle import load_bundle, write_manifest  # noqa: E402


def plain_bundle(d: Path, model: Path, in_dim: int = 64) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    os.replace(model, d / model.name) if model.parent != d else None
    write_manifest(d, {"name": "bench", "version": "1.0.0",
                       "input": {"name": "input", "shape": [None, in_dim], "dtype": "float32", "min": 0.0, "max": 16.0},
                       "files": {model.name: {"role": "backbone"}}})
    return d


def per_call_us(fn, x, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn(x)
    return (time.perf_counter() - t) / n * 1e6


def interleaved(a, b, x, blocks: int, n: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(blocks):
        ta.append(per_call_us(a, x, n))
        tb.append(per_call_us(b, x, n))
    return float(np.median(ta)), float(np.median(tb))


def wide_backbone(work: Path, rng, target_ms: float, quick: bool) -> tuple[Path, Path, int, float]:
    """Widen a dense int8 backbone until raw ORT inference takes >= target_ms (batch 1, 1 thread)."""
    cal = rng.uniform(0, 16, (64, 64)).astype(np.float32)
    width = 1024
    while True:
        layers = init_mlp([64, width, width, width, width, 64], rng)
        fp32, int8 = work / f"wide{width}_fp32.onnx", work / f"wide{width}.onnx"
        dense_to_onnx(layers, fp32, 64, relu_last=True)
        quantize_static_int8(fp32, int8, cal)
        rt = OnnxRuntime(int8, threads=1)
        x = cal[:1]
        per_call_us(rt.run, x, 20)
        ms = per_call_us(rt.run, x, 50 if quick else 200) / 1000
        if ms >= target_ms or width >= 8192:
            return fp32, int8, width, ms
        width = int(width * max(1.25, min(2.0, (target_ms / ms) ** 0.5 * 1.1)) // 64 * 64)


def litert_vs_ort(work: Path, x: np.ndarray, n: int, blocks: int) -> dict:
    model = ROOT / "tests" / "models" / "digits_float.tflite"
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model), experimental_preserve_all_tensors=True)
    it.allocate_tensors()
    layers = []
    for op in it._get_ops_details():
        if op["op_name"] == "FULLY_CONNECTED":
            _, wi, bi = op["inputs"]
            layers.append((it.get_tensor(wi).T.astype(np.float32), it.get_tensor(bi).astype(np.float32)))
    onnx_path = work / "digits_same_weights.onnx"
    dense_to_onnx(layers, onnx_path, 64, relu_last=False, output_name="logits")
    lite, ort_rt = LiteRtRuntime(model, threads=1), OnnxRuntime(onnx_path, threads=1)
    xi = x[:1]
    lo = lite.run(xi)
    oo = ort_rt.run(xi)
    e = np.exp(oo - oo.max())
    diff = float(np.abs(lo - e / e.sum()).max())
    tl, to = interleaved(lite.run, ort_rt.run, xi, blocks, n)
    return {"litert_us": round(tl, 2), "ort_same_weights_us": round(to, 2),
            "litert_vs_ort_latency_ratio": round(tl / to, 3), "litert_ort_max_prob_diff": round(diff, 6)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer iterations (< 60 s)")
    a = ap.parse_args()
    n, blocks = (200, 7) if a.quick else (1000, 15)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    fig: dict = {}

    t0 = time.time()
    rep = build_example(work / "example", "small", epochs=30 if a.quick else 40)
    fig.update(example_int8_size_ratio=round(rep.fp32_bytes / rep.int8_bytes, 3),
               int8_accuracy_drop_pts=round(100 * (rep.fp32_accuracy - rep.int8_accuracy), 3),
               fp32_accuracy=rep.fp32_accuracy, int8_accuracy=rep.int8_accuracy)
    print(f"example digits bundle: fp32 {rep.fp32_bytes / 1024:.0f} KB {rep.fp32_accuracy:.2%} → "
          f"int8 {rep.int8_bytes / 1024:.0f} KB {rep.int8_accuracy:.2%}  (built in {time.time() - t0:.1f} s)")

    fp32, int8, width, raw_ms = wide_backbone(work, rng, 1.0, a.quick)
    size_ratio = fp32.stat().st_size / int8.stat().st_size
    fig.update(int8_size_ratio=round(size_ratio, 3), backbone_width=width,
               backbone_params=int(64 * width + 3 * width * width + width * 64),
               backbone_int8_mb=round(int8.stat().st_size / 2**20, 2))
    print(f"realistic backbone 64-{width}x4-64: fp32 {fp32.stat().st_size / 2**20:.1f} MB → int8 "
          f"{int8.stat().st_size / 2**20:.1f} MB ({size_ratio:.2f}x), raw int8 {raw_ms:.2f} ms")

    b = load_bundle(plain_bundle(work / "wide_bundle", int8))
    eng = InferenceEngine(b, threads=1)
    sess = eng.runtime.session  # the very same session: only our code differs
    name = eng.runtime.input.name
    x = rng.uniform(0, 16, (1, 64)).astype(np.float32)
    raw = lambda v: sess.run(None, {name: v})  # noqa: E731
    per_call_us(raw, x, 50)
    per_call_us(eng.predict, x, 50)
    t_agent, t_raw = interleaved(eng.predict, raw, x, blocks, max(20, n // 10))
    fig.update(raw_us=round(t_raw, 2), agent_us=round(t_agent, 2), overhead_us=round(t_agent - t_raw, 2),
               overhead_ratio=round(t_agent / t_raw, 4))
    print(f"agent path {t_agent:.1f} us vs raw InferenceSession.run {t_raw:.1f} us: ratio {t_agent / t_raw:.3f}, "
          f"added {t_agent - t_raw:.1f} us per request")

    small = InferenceEngine(load_bundle(work / "example"), threads=1)
    s_raw = lambda v: small.runtime.session.run(None, {"input": v})  # noqa: E731
    _, _, xt, _ = digits_split()
    ts_agent, ts_raw = interleaved(small.predict, s_raw, xt[:1], blocks, n)
    fig.update(example_raw_us=round(ts_raw, 2), example_agent_us=round(ts_agent, 2),
               example_overhead_us=round(ts_agent - ts_raw, 2))
    print(f"example bundle (backbone + head): agent {ts_agent:.1f} us vs raw backbone {ts_raw:.1f} us")

    lr = litert_vs_ort(work, xt, n, blocks)
    fig.update(lr)
    print(f"LiteRT {lr['litert_us']:.1f} us vs ONNX Runtime {lr['ort_same_weights_us']:.1f} us on the same weights "
          f"(ratio {lr['litert_vs_ort_latency_ratio']:.2f}, max prob diff {lr['litert_ort_max_prob_diff']:.1e})")
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
