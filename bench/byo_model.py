"""Bring your own model, measured on a real one: PaddleOCR's text-orientation classifier
(``ch_ppocr_mobile_v2.0_cls_infer.onnx``, paddle2onnx export, in the rapidocr-onnxruntime wheel).

1. ``fleetctl model import`` path in-process (normalise, cut auto, int8 on rendered text lines):
   fp32 vs int8 size ratio (fp32 / int8, > 1 = smaller), accuracy drop, agreement.
2. The agent's path (``InferenceEngine.predict``: validation, backbone, head) vs a raw
   ``InferenceSession.run`` of the same backbone on the same inputs, taking turns (ratio of p50s).
3. A binary tensor request round trip: a real ``edge-agent`` process serving the bundle, a real
   Mosquitto on a loopback port, ``FleetClient.infer_tensors`` (a [1, 3, 48, 192] float32 frame).

Never fails on a number; the last line is one JSON object with ``int8_size_ratio``,
``int8_agreement``, ``int8_accuracy_drop_pts``, ``agent_vs_raw_ratio``, ``binary_request_ms_p50``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from brokers import start_mosquitto  # noqa: E402 - bench/ is on sys.path when run as a script

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.disable(logging.WARNING)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def agent_vs_raw(bundle: Path, x: np.ndarray, n: int) -> tuple[float, float]:
    from agent.serving.inference import InferenceEngine
    from controller.modeltools.quantize import session
    from protocol.bundle import load_bundle

    eng = InferenceEngine(load_bundle(bundle))
    sess = session(eng.bundle.backbone_path)
    name, out = sess.get_inputs()[0].name, [sess.get_outputs()[0].name]
    a, r = [], []
    for i in range(n + 10):
        xi = x[i % len(x)]
        t = time.perf_counter()
        eng.predict(xi)
        ta = time.perf_counter()
        sess.run(out, {name: xi[None]})
        tr = time.perf_counter()
        if i >= 10:
            a.append((ta - t) * 1000)
            r.append((tr - ta) * 1000)
    return pct(a, 50), pct(r, 50)


async def binary_requests(port: int, dev: str, x: np.ndarray, n: int) -> list[float]:
    from controller.client import FleetClient
    from controller.config import load_config

    cfg = load_config(None, {"mqtt": {"broker": f"mqtt://127.0.0.1:{port}"}})
    out: list[float] = []
    async with FleetClient(cfg) as fc:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if (await fc.infer_tensors(dev, {"x": x[:1]}, timeout=3)).get("ok"):
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
        for i in range(n + 10):
            t = time.perf_counter()
            r = await fc.infer_tensors(dev, {"x": x[i % len(x)][None]}, timeout=10)
            if i >= 10 and r.get("ok"):
                out.append((time.perf_counter() - t) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples and requests (< 60 s)")
    a = ap.parse_args()
    from controller.modeltools.importer import ImportOptions, import_model
    from controller.modeltools.quantize import quiet_ort
    from controller.modeltools.wheel_models import ocr_cls_model, text_orientation_set

    n_cal, n_eval, n_req = (8, 24, 40) if a.quick else (64, 400, 400)
    work = Path(tempfile.mkdtemp(prefix="bench-byo-"))
    x, y = text_orientation_set(n_cal + n_eval, seed=1)
    np.savez(work / "cal.npz", x=x[:n_cal], y=y[:n_cal])
    np.savez(work / "eval.npz", x=x[n_cal:], y=y[n_cal:])
    t0 = time.perf_counter()
    with quiet_ort():
        rep = import_model(ocr_cls_model(), work / "bundle", ImportOptions(
            "ocr-cls", input_shapes={"": [1, 3, 48, 192]}, cut="auto", labels=["0", "180"],
            calibration=str(work / "cal.npz"), eval=str(work / "eval.npz"), input_min=-1.0, input_max=1.0))
    import_s = time.perf_counter() - t0
    c = rep.comparison or {}
    agent50, raw50 = agent_vs_raw(work / "bundle", x[n_cal:], n_req)
    broker, port = start_mosquitto(work)
    cfg = work / "byo-1.toml"
    cfg.write_text(f'[device]\nid = "byo-1"\n[mqtt]\nbroker = "mqtt://127.0.0.1:{port}"\n'
                   f'[telemetry]\ninterval_s = 60\n[state]\ndir = "{work / "byo-1"}"\n'
                   f'[model]\nbundle = "{work / "bundle"}"\n')
    agent = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=open(work / "agent.log", "wb"))
    try:
        lat = asyncio.run(binary_requests(port, "byo-1", x[n_cal:], n_req))
    finally:
        agent.terminate()
        try:
            agent.wait(10)
        except subprocess.TimeoutExpired:
            agent.kill()
        broker.terminate()
        broker.wait(5)
    drop = None
    if c.get("fp32_accuracy") is not None:
        drop = round(100 * (c["fp32_accuracy"] - c["int8_accuracy"]), 2)
    res = {"model": "ch_ppocr_mobile_v2.0_cls_infer.onnx", "kept": rep.kept, "import_s": round(import_s, 2),
           "fp32_bytes": c.get("fp32_bytes"), "int8_bytes": c.get("int8_bytes"),
           "int8_size_ratio": round(c["size_ratio"], 3) if c else None,
           "fp32_accuracy": c.get("fp32_accuracy"), "int8_accuracy": c.get("int8_accuracy"),
           "int8_accuracy_drop_pts": drop, "int8_agreement": c.get("agreement"), "eval_samples": c.get("samples"),
           "agent_p50_ms": round(agent50, 4), "raw_run_p50_ms": round(raw50, 4),
           "agent_vs_raw_ratio": round(agent50 / raw50, 3),
           "binary_request_ms_p50": round(pct(lat, 50), 3) if lat else None,
           "binary_request_ms_p99": round(pct(lat, 99), 3) if lat else None, "binary_requests": len(lat)}
    print(f"import {import_s:.1f} s; fp32 {res['fp32_bytes']} B → int8 {res['int8_bytes']} B "
          f"({res['int8_size_ratio']}x smaller), accuracy {res['fp32_accuracy']} → {res['int8_accuracy']}, "
          f"agreement {res['int8_agreement']}")
    print(f"agent path p50 {agent50:.3f} ms vs raw InferenceSession.run {raw50:.3f} ms "
          f"({res['agent_vs_raw_ratio']}x); binary request p50 {res['binary_request_ms_p50']} ms over {len(lat)}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
