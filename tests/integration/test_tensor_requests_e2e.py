"""Tensor requests end to end through real agents on a real Mosquitto: an image by binary frame
(ONNX Runtime and LiteRT, ``fleetctl infer --image``), and a refused request that used to get no
reply at all (a 971 KB JSON image) now answered ``oversize``."""
from __future__ import annotations

import asyncio
import json

import numpy as np
from tests.helpers.fleet import fleetctl, start_agent, agent_config, stop
from tests.helpers.models import conv_bundle, face_bundle
from tests.helpers.waiting import Probe, wait_for


def test_images_by_binary_frame_on_onnx_and_litert_and_an_oversize_json_gets_its_reply(tmp_path, mosquitto):
    from PIL import Image

    from controller.client import FleetClient
    from controller.config import load_config

    conv = conv_bundle(tmp_path / "conv", tmp_path)
    face = face_bundle(tmp_path / "face", threshold=-100.0)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/+/state",))
    procs = [start_agent(agent_config(tmp_path, dev, mosquitto.url, interval=5, extra=f'[model]\nbundle = "{b}"\n'),
                         tmp_path / f"{dev}.log") for dev, b in (("onnx-img", conv), ("tfl-img", face))]
    try:
        for dev in ("onnx-img", "tfl-img"):
            probe.wait(lambda t, p, d=dev: t.endswith(f"{d}/state") and b'"model"' in p, timeout=60,
                       what=f"{dev} serving")
        # fleetctl infer --image: resized to the served input (32x32 uint8 / 128x128 float in [-1, 1])
        out = fleetctl("--broker", mosquitto.url, "infer", "onnx-img", "--image", str(tmp_path / "p.png"), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        r = json.loads(out.stdout)["result"]
        assert r["task"] == "classify" and r["label_name"] in ("cat", "dog", "bird") and len(r["top_k"]) == 2
        out = fleetctl("--broker", mosquitto.url, "infer", "tfl-img", "--image", str(tmp_path / "p.png"), "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        r = json.loads(out.stdout)["result"]
        assert r["task"] == "detect" and r["count"] == 5 and len(r["detections"][0]["box"]) == 4

        async def client_side():
            cfg = load_config(None, {"mqtt": {"broker": mosquitto.url}})
            async with FleetClient(cfg) as fc:
                img = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
                framed = await fc.infer_tensors("onnx-img", {"image": img}, timeout=20)
                as_json = await fc.infer("onnx-img", img.tolist(), timeout=20)
                # 128x128x3 as JSON floats: ~971 KB, over the 256 KiB JSON limit (no reply before: a 5 s timeout)
                big = np.random.default_rng(2).uniform(-1, 1, (128, 128, 3)).round(6).tolist()
                oversize = await fc.infer("tfl-img", big, timeout=20)
                wrong = await fc.infer_tensors("tfl-img", {"input": np.zeros((64, 64, 3), np.float32)}, timeout=20)
                return framed, as_json, oversize, wrong

        framed, as_json, oversize, wrong = asyncio.run(client_side())
        assert framed["ok"] and as_json["ok"] and framed["result"]["label"] == as_json["result"]["label"]
        assert oversize["ok"] is False and oversize["reason"] == "oversize" and "binary frame" in oversize["error"]
        assert wrong["reason"] == "bad_shape" and "[128, 128, 3]" in wrong["error"]
    finally:
        probe.close()
        for p in procs:
            stop(p)
