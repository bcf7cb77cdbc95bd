"""Patch size benchmark: a head-only change shipped as a signed patch vs the full bundle.

For the example digits bundle and for a bundle with a realistic-size int8 backbone (35 M
parameters), retrain only the head (a new version, as on-device learning or a federated round
produces) and compare the patch (``protocol.patch.make_patch``: only changed files, zstd,
Ed25519-signed) with the full bundle shipped as a patch against nothing.
Then the rollout itself: a controller and 50 agents (one process, one event loop, each agent with
its own MQTT session, model store and ONNX Runtime session) on a real Mosquitto (the embedded broker
when Mosquitto is not installed); ``fleetctl deploy``'s rollout (10 % canary, then the rest) of the
head-only patch, timed from the rollout's creation until every agent serves the new version
(``rollout_50_seconds``). Baseline in the same run: the broker carrying the same patch bytes to 50
subscribers with plain paho publishes (``rollout_vs_raw_publish``). Last, a new large backbone to one
agent: the whole patch travels in signed, hash-checked, resumable chunks (``big_transfer_seconds``,
from the device's own events) vs the same bytes as one plain MQTT message (``big_transfer_vs_raw_publish``).
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


def start_broker(work: Path):
    """A real Mosquitto on a free loopback port, else the embedded broker."""
    from brokers import mosquitto_binary, start_mosquitto

    if mosquitto_binary() is None:
        from controller.broker import EmbeddedBroker

        b = EmbeddedBroker().start()
        return b.url, b.stop, "amqtt"
    proc, port = start_mosquitto(work, "max_queued_messages 100000\n")
    return f"mqtt://127.0.0.1:{port}", lambda: (proc.terminate(), proc.wait(5)), "mosquitto"


def raw_publish_seconds(url: str, n: int, size: int) -> float:
    """Baseline: the broker carries n messages of ``size`` bytes (QoS 1) from one paho client to n subscribers."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.mqttlink import set_nodelay

    host, port = url.rsplit("/", 1)[1].split(":")
    got = threading.Semaphore(0)
    subs = []
    for i in range(n):
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-sub-{i}")
        c.on_message = lambda *a: got.release()
        c.on_socket_open = lambda cl, ud, sock: set_nodelay(sock)
        c.connect(host, int(port))
        c.subscribe(f"raw/{i}", 1)
        c.loop_start()
        subs.append(c)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-pub")
    pub.on_socket_open = lambda cl, ud, sock: set_nodelay(sock)
    pub.connect(host, int(port))
    pub.loop_start()
    time.sleep(0.5)
    payload = b"\x5a" * size
    t = time.perf_counter()
    for i in range(n):
        pub.publish(f"raw/{i}", payload, 1)
    for _ in range(n):
        got.acquire(timeout=30)
    dt = time.perf_counter() - t
    for c in subs + [pub]:
        c.disconnect()
    for c in subs + [pub]:
        c.loop_stop()
    return dt


def rollout_figures(work: Path, v1: Path, v2: Path, n: int, patch_bytes: int, big: Path | None = None) -> dict:
    """Time a real rollout of v1 -> v2 to ``n`` in-process agents; then, with ``big``, the chunked
    transfer of a whole new (large) backbone to one of them."""
    import asyncio

    from agent.core.config import parse_config as agent_config
    from agent.app import Agent
    from controller.config import parse_config as ctl_config
    from controller.rollouts.policy import RolloutPolicy, plan_waves
    from controller.service import ControllerService
    from protocol.signing import generate as gen, save_keypair

    url, stop_broker, broker = start_broker(work)
    key = gen()
    save_keypair(key, work / "ctl.pem", work / "ctl.pub")

    async def go() -> dict:
        stop = asyncio.Event()
        svc = ControllerService(ctl_config({"registry": {"path": str(work / "reg.db")}, "mqtt": {"broker": url},
                                            "security": {"signing_key": str(work / "ctl.pem")}}))
        tasks = [asyncio.create_task(svc.run(stop))]
        await asyncio.sleep(1.0)
        agents = []
        t0 = time.perf_counter()
        for i in range(n):
            a = Agent(agent_config({"device": {"id": f"b{i:02d}"}, "mqtt": {"broker": url},
                                    "telemetry": {"interval_s": 30.0}, "homeassistant": {"enabled": False},
                                    "state": {"dir": str(work / "agents" / f"b{i:02d}")},
                                    "model": {"bundle": str(v1)},
                                    "security": {"trusted_keys": [str(work / "ctl.pub")]}}))
            agents.append(a)
            tasks.append(asyncio.create_task(a.run(stop)))
        reg = svc.registry

        def on(version: str) -> int:
            return sum(1 for d in reg.devices() if d.online and ((d.state or {}).get("model") or {})
                       .get("version") == version)

        while on("1.0.0") < n and time.perf_counter() - t0 < 120:
            await asyncio.sleep(0.2)
        started = time.perf_counter() - t0
        store = svc.rollouts.store
        store.add_bundle(v1)
        art = store.add_bundle(v2)
        devs = sorted(d.id for d in reg.devices())
        current = {d.id: (((d.state or {}).get("model") or {}).get("bundle_sha256"), "1.0.0") for d in reg.devices()}
        if on("1.0.0") < n:
            print(f"only {on('1.0.0')} of {n} agents came up serving 1.0.0 in {started:.0f} s", file=sys.stderr)
        policy = RolloutPolicy(canary=0.1, max_failures=0, wave_timeout_s=300)
        t1 = time.perf_counter()
        store.create_rollout("bench", art.version, art.bundle_sha256, policy.to_dict(), {"all": True},
                             plan_waves(devs, 0.1), current)
        status = "running"
        while status == "running" and time.perf_counter() - t1 < 300:
            await asyncio.sleep(0.1)
            status = store.rollout("bench").status
        seconds = time.perf_counter() - t1
        done = on(art.version)
        counts = dict(svc.rollouts.counts)
        for slot in store.slots("bench"):
            if slot.status in ("failed", "rolled_back", "timeout"):
                print(f"  {slot.device_id} {slot.status}: {slot.reason}", file=sys.stderr)
        print(f"  ({n} agents came up serving 1.0.0 in {started:.1f} s)", file=sys.stderr)
        out = {"status": status, "seconds": seconds, "updated": done, "agents_start_s": started, **counts}
        if big is not None:
            out.update(await big_transfer(svc, store, big))
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        return out

    async def big_transfer(svc, store, big: Path) -> dict:
        """A new backbone to b00: the patch carries the whole backbone, in chunks (timed from the device's
        own 'downloading' and 'received' events; the health gate may then refuse a slower model)."""
        art = store.add_bundle(big)
        dev = svc.registry.device("b00")
        cur = (dev.state["model"]["bundle_sha256"], dev.state["model"]["version"])
        store.create_rollout("big", art.version, art.bundle_sha256, RolloutPolicy(canary=0).to_dict(), {},
                             [["b00"]], {"b00": cur})
        t = time.perf_counter()
        marks: dict = {}
        while time.perf_counter() - t < 120 and "received" not in marks:
            await asyncio.sleep(0.1)
            for e in svc.registry.events("b00", limit=20):
                b = e["body"]
                if e["event"] == "model.update" and b.get("version") == art.version:
                    marks.setdefault(b["status"], (e["ts"], b))
        if "received" not in marks or "downloading" not in marks:
            return {"big_transfer_seconds": None}
        dt = marks["received"][0] - marks["downloading"][0]
        size = marks["received"][1].get("bytes") or 0
        print(f"new backbone ({size / 2**20:.1f} MB patch, {marks['downloading'][1].get('chunks')} chunks) to one "
              f"agent: {dt:.2f} s ({size / 2**20 / max(dt, 1e-9):.1f} MB/s)")
        return {"big_patch_bytes": size, "big_transfer_seconds": round(dt, 3),
                "big_transfer_mb_per_s": round(size / 2**20 / max(dt, 1e-9), 2),
                "big_chunks": marks["downloading"][1].get("chunks")}

    try:
        t = time.perf_counter()
        r = asyncio.run(go())
        print(f"  (fleet run {time.perf_counter() - t:.1f} s)", file=sys.stderr)
        t = time.perf_counter()
        raw = raw_publish_seconds(url, n, patch_bytes)
        print(f"  (raw baseline {time.perf_counter() - t:.1f} s)", file=sys.stderr)
        if r.get("big_transfer_seconds"):
            raw_big = raw_publish_seconds(url, 1, r["big_patch_bytes"])
            r["big_raw_publish_seconds"] = round(raw_big, 4)
            r["big_transfer_vs_raw_publish"] = round(r["big_transfer_seconds"] / max(raw_big, 1e-9), 1)
            print(f"  the same bytes as one plain MQTT message: {raw_big:.3f} s "
                  f"(chunked, verified, resumable transfer: {r['big_transfer_vs_raw_publish']}x)")
    finally:
        stop_broker()
    print(f"rollout of the head-only patch to {n} agents on {broker}: {r['status']}, {r['updated']}/{n} updated in "
          f"{r['seconds']:.2f} s (10% canary then the rest; {r.get('patches_made', 0)} patch made, "
          f"{r.get('chunks_sent', 0)} chunks sent); raw publish of the same bytes to {n} subscribers {raw * 1000:.1f} ms")
    extra = {k: v for k, v in r.items() if k.startswith("big_")}
    return {**extra, "rollout_50_seconds" if n == 50 else f"rollout_{n}_seconds": round(r["seconds"], 3),
            "rollout_updated": r["updated"], "rollout_status": r["status"], "rollout_agents": n,
            "rollout_broker": broker, "raw_publish_seconds": round(raw, 4),
            "rollout_vs_raw_publish": round(r["seconds"] / raw, 1) if raw > 0 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t_start = time.perf_counter()
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
    new_head_version(big, work / "big2", "2.0.0", rng)
    p2, f2, ms2 = sizes(big, work / "big2", key)
    print(f"realistic backbone (64-{width}x4-64 int8): head-only patch {p2} B vs full bundle {f2 / 2**20:.1f} MB "
          f"({p2 / f2:.4%}), made in {ms2:.0f} ms")
    fig.update(realistic_head_patch_bytes=p2, realistic_full_bundle_bytes=f2,
               realistic_head_patch_fraction=round(p2 / f2, 6), backbone_width=width)
    print(f"  (patch sizes measured at {time.perf_counter() - t_start:.1f} s)", file=sys.stderr)
    fig.update(rollout_figures(work, work / "v1", work / "v2", 50, p, big=work / "big2"))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
