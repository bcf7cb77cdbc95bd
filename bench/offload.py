"""Offload benchmark: accuracy and latency of local-only, always-offload and the policy at
several thresholds; worker throughput with 1, 2 and 4 workers (the digits MLP); on an image
model (the shapes CNN, controller/modeltools/cnn.py): early exits (compute saved, accuracy
drop) and the learned bottleneck at the split (whole feature request vs whole raw request on
the wire, accuracy drop through the worker's decoder + tail); deadline scheduling across
workers (bench/offload_sched.py).

Real parts: the example bundle (device) and the large bundle (worker) built here, a real
Mosquitto on a free loopback port, real ``fleetctl offload-worker`` processes on an MQTT 5
shared subscription and a load generator with many requests in flight. The accuracy/latency
curve combines, per test sample, the device's own answer and the worker's answer with the
measured local latency and the measured request round trip (mean over real requests).
Never fails on a number; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from brokers import start_mosquitto  # noqa: E402 - bench/ is on sys.path when run as a script
from offload_sched import deadline_figures  # noqa: E402 - sched21's deadline scheduling figures

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.disable(logging.WARNING)

from agent.serving.inference import InferenceEngine  # noqa: E402
from controller.modeltools.example import build_example, digits_split  # noqa: E402
from controller.offload.worker import OffloadModel  # noqa: E402
from protocol.binary import encode_frame  # noqa: E402
from protocol.bundle import load_bundle  # noqa: E402
from protocol.envelope import Envelope, decode  # noqa: E402


def mqtt_publish_bytes(topic: str, payload: bytes, response_topic: str, correlation: bytes) -> int:
    """One whole MQTT 5 PUBLISH (QoS 1) as it goes on the wire: fixed header, topic, packet id,
    properties (response topic, correlation data) and payload."""
    props = (1 + 2 + len(response_topic.encode())) + (1 + 2 + len(correlation))
    rest = 2 + len(topic.encode()) + 2 + _varint_len(props) + props + len(payload)
    return 1 + _varint_len(rest) + rest


def _varint_len(n: int) -> int:
    k = 1
    while n >= 128:
        n >>= 7
        k += 1
    return k


def image_figures(quick: bool) -> dict:
    """Early exits and the bottleneck on the shapes CNN, through the agent's and the worker's code."""
    from agent.serving.inference import InferenceEngine as Engine
    from protocol.binary import decode_frame
    from protocol.envelope import new_id
    from protocol.offload import worker_req_topic
    from tests.helpers.bundles import cached_cnn, cached_exit_bundles

    t0 = time.perf_counter()
    plain_dir, cnn_report = cached_cnn()
    built = cached_exit_bundles(8000)
    build_s = time.perf_counter() - t0
    plain = Engine(load_bundle(plain_dir))
    exits = Engine(load_bundle(built["pair_a"]))
    worker = OffloadModel(load_bundle(built["pair_a"]))
    with np.load(built["pair_a"] / "eval.npz") as z:
        x, y = z["x"], z["y"]
    if quick:
        x, y = x[:500], y[:500]
    # early exits vs the whole model, same inputs, same process, interleaved
    t_plain = t_exit = 0.0
    full, early = [], []
    for xi in x:
        a = time.perf_counter()
        full.append(plain.predict(xi))
        b = time.perf_counter()
        early.append(exits.predict(xi))
        t_exit += time.perf_counter() - b
        t_plain += b - a
    acc_full = float(np.mean([p.label == yi for p, yi in zip(full, y)]))
    acc_exit = float(np.mean([p.label == yi for p, yi in zip(early, y)]))
    em = exits.metrics()["early_exits"]
    # the bottleneck: every request as the board would offload it at the cut, answered by the worker
    topic, reply = worker_req_topic("edgefleet/v1", "w-a"), "edgefleet/v1/dev/pi-07/reply/offload"
    feat_sizes, raw_sizes, remote = [], [], []
    for xi, p in zip(x, early):
        code, extra, compress = exits.exits.offload_tensor(p)
        corr = new_id()
        body = {"mode": "features", "deadline_ts": time.time() + 0.2, "budget_ms": 200.0, "model": "shapes", **extra}
        env = Envelope(kind="offload.request", sender="pi-07", body=body, reply_to=reply, corr=corr)
        frame = encode_frame(env, {"x": code}, compress=compress)
        raw_env = Envelope(kind="offload.request", sender="pi-07", reply_to=reply, corr=corr,
                           body={"mode": "raw", "deadline_ts": body["deadline_ts"], "budget_ms": 200.0,
                                 "model": "shapes"})
        raw = encode_frame(raw_env, {"x": xi})
        feat_sizes.append(mqtt_publish_bytes(topic, frame, reply, corr.encode()))
        raw_sizes.append(mqtt_publish_bytes(topic, raw, reply, corr.encode()))
        d = decode_frame(frame)
        remote.append(worker.answer("features", d.tensors["x"], dict(d.envelope.body))[0])
    acc_bn = float(np.mean(np.array(remote) == y))
    bn = load_bundle(built["pair_a"]).manifest.bottleneck
    bm = json.loads((built["pair_a"] / "manifest.json").read_text())["metrics"]
    print(f"image model: shapes CNN 32x32x3 uint8, fp32 accuracy {acc_full:.4f} ({len(x)} eval images; "
          f"bundles ready in {build_s:.1f} s)")
    print(f"early exits: accuracy {acc_exit:.4f} ({(acc_full - acc_exit) * 100:+.2f} pts), backbone MACs not run "
          f"{em['backbone_saved']:.1%} ({em['compute_saved']:.1%} net of the exit heads), time not spent "
          f"{1 - t_exit / t_plain:.1%}, answered per exit "
          f"{[r['rate'] for r in em['exits']]}")
    print(f"bottleneck at {bn.at}: {bn.channels} channels int8 + zstd; request {np.mean(feat_sizes):.0f} B vs raw "
          f"{np.mean(raw_sizes):.0f} B on the wire; accuracy through decoder + tail {acc_bn:.4f}")
    return {"feature_bytes_ratio": round(float(np.mean(feat_sizes)) / float(np.mean(raw_sizes)), 4),
            "request_bytes_features": round(float(np.mean(feat_sizes)), 1),
            "request_bytes_raw": round(float(np.mean(raw_sizes)), 1),
            "bottleneck_acc_drop_pts": round((acc_full - acc_bn) * 100, 3),
            # the backbone's multiply-accumulates not run (the definition), and net of the
            # exit heads' own MACs (every enabled head up to the answering exit)
            "early_exit_compute_saved": em["backbone_saved"],
            "early_exit_net_compute_saved": em["compute_saved"],
            "early_exit_time_saved": round(1 - t_exit / t_plain, 4),
            "early_exit_acc_drop_pts": round((acc_full - acc_exit) * 100, 3),
            "image_accuracy_full": round(acc_full, 4), "image_accuracy_exits": round(acc_exit, 4),
            "image_accuracy_bottleneck": round(acc_bn, 4), "image_eval_samples": int(len(x)),
            "early_exit_rates": [r["rate"] for r in em["exits"]],
            "bottleneck": {"at": bn.at, "channels": bn.channels, "ratio": bn.ratio, "epochs": bm["bottleneck"]["epochs"],
                           "train_seconds": bm["bottleneck"]["train_seconds"], "training": bm["bottleneck"]["training"]},
            "exit_training": bm["exits"]["training"], "cnn_train_seconds": cnn_report.get("train_seconds")}


def wait_workers(port: int, ids: list[str], timeout: float = 90.0) -> None:
    """Until every worker's retained status is on the broker (start-up takes seconds when loaded)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    seen: set[str] = set()
    ev = threading.Event()

    def on_message(cl, u, m):
        if m.payload:
            seen.add(m.topic.rsplit("/", 1)[1])
        if set(ids) <= seen:
            ev.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"wait-{os.getpid()}", protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_connect = lambda cl, u, f, rc, p=None: cl.subscribe("edgefleet/v1/offload/workers/+", 1)
    c.connect("127.0.0.1", port)
    c.loop_start()
    ev.wait(timeout)
    c.loop_stop()
    c.disconnect()
    time.sleep(0.3)   # their subscriptions are made before the status goes out; a margin for the broker


def start_broker(work: Path) -> tuple[subprocess.Popen, int]:
    return start_mosquitto(work)


def load(port: int, x: np.ndarray, seconds: float, inflight: int, mode: str = "raw", feats=None, sha="",
         scale=1.0) -> tuple[float, float]:
    """Replies per second and mean round trip (ms) with ``inflight`` requests outstanding."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.mqttlink import set_nodelay

    sent: dict[str, float] = {}
    rtts: list[float] = []
    lock = threading.Lock()
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"loadgen-{os.getpid()}", protocol=mqtt.MQTTv5)
    c.on_socket_open = lambda cl, ud, sock: set_nodelay(sock)
    reply = "edgefleet/v1/dev/loadgen/reply/offload"
    n = {"i": 0, "ok": 0}

    def send():
        i = n["i"]
        n["i"] += 1
        corr = f"c{i}"
        body = {"mode": mode, "deadline_ts": time.time() + 30, "model": "digits"}
        t = {"x": x[i % len(x)]}
        if mode == "features":
            body.update(scale=scale, backbone_sha256=sha)
            t = {"x": feats[i % len(feats)]}
        env = Envelope(kind="offload.request", sender="loadgen", body=body, reply_to=reply, corr=corr)
        with lock:
            sent[corr] = time.perf_counter()
        c.publish("edgefleet/v1/offload/req", encode_frame(env, t), 1)

    def on_message(cl, u, m):
        env = decode(m.payload)
        with lock:
            t0 = sent.pop(env.corr, None)
        if t0 is not None and env.body.get("ok"):
            rtts.append((time.perf_counter() - t0) * 1000)
            n["ok"] += 1
        if not done.is_set():
            send()

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.subscribe(reply, 1)
    c.loop_start()
    time.sleep(0.3)
    t0 = time.perf_counter()
    start_ok = 0
    for _ in range(inflight):
        send()
    time.sleep(seconds)
    done.set()
    elapsed = time.perf_counter() - t0
    c.loop_stop()
    c.disconnect()
    return (n["ok"] - start_ok) / elapsed, float(np.mean(rtts)) if rtts else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    secs = 2.0 if a.quick else 8.0
    t_bench = time.perf_counter()
    img = image_figures(a.quick)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-offload-"))
    build_example(work / "small", "small", epochs=30)
    build_example(work / "large", "large", epochs=30)
    small = InferenceEngine(load_bundle(work / "small"))
    big = OffloadModel(load_bundle(work / "large"))
    _, _, xte, yte = digits_split()
    # a harder input stream for the small device model: contrast drift (the worker model is just bigger)
    xd = np.clip(xte * 0.5 + 5, 0, 16).astype(np.float32)
    local = [small.predict(xi) for xi in xd]
    remote = [big.answer("raw", xi, {})[0] for xi in xd]
    local_ms = float(np.mean([p.latency_ms for p in local]))
    # bytes on the wire for one request
    env = Envelope(kind="offload.request", sender="pi-07", body={"mode": "raw", "deadline_ts": 0.0, "model": "digits"},
                   reply_to="edgefleet/v1/dev/pi-07/reply/offload", corr="x" * 32)
    raw_b = len(encode_frame(env, {"x": xd[0]}))
    f = local[0].features.reshape(-1)
    q = np.clip(np.round(f / (f.max() / 255)), 0, 255).astype(np.uint8)
    env_f = Envelope(kind="offload.request", sender="pi-07", body={"mode": "features", "deadline_ts": 0.0,
                                                                    "model": "digits", "scale": 0.1,
                                                                    "backbone_sha256": "0" * 64},
                     reply_to="edgefleet/v1/dev/pi-07/reply/offload", corr="x" * 32)
    feat_b = len(encode_frame(env_f, {"x": q}))
    payload_ratio = q.nbytes / xd[0].nbytes

    broker, port = start_broker(work)
    env_vars = {**os.environ, "PYTHONPATH": str(ROOT)}
    fig: dict = {}
    tput = {}
    rtt_ms = float("nan")
    try:
        for n in (1, 2, 4):
            ws = [subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", f"mqtt://127.0.0.1:{port}",
                                    "offload-worker", "--bundle", str(work / "large"), "--id", f"b{n}-{i}"],
                                   env=env_vars, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                  for i in range(n)]
            wait_workers(port, [f"b{n}-{i}" for i in range(n)])
            if n == 1:
                _, rtt_ms = load(port, xd, min(2.0, secs), inflight=1)  # one at a time: the round trip
            rate, _ = load(port, xd, secs, inflight=32)
            tput[n] = round(rate, 1)
            print(f"{n} worker(s): {rate:.0f} requests/s")
            for w in ws:
                w.terminate()
            for w in ws:
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:   # a loaded machine: do not leave it behind
                    w.kill()
                    w.wait()
    finally:
        broker.terminate()
        broker.wait(5)

    curve = []
    for thr in (0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0):
        off = [(p.confidence < thr) or thr >= 1.0 for p in local]
        labels = [r if o else p.label for p, r, o in zip(local, remote, off)]
        acc = float(np.mean(np.array(labels) == yte))
        rate = float(np.mean(off))
        curve.append({"threshold": thr, "accuracy": round(acc, 4), "offload_rate": round(rate, 4),
                      "mean_latency_ms": round(local_ms + rate * rtt_ms, 3)})
        print(f"threshold {thr:.2f}: accuracy {acc:.4f}, offload rate {rate:.1%}, mean latency "
              f"{local_ms + rate * rtt_ms:.3f} ms")
    pick = next(c for c in curve if c["threshold"] == 0.9)
    fig.update(local_accuracy=curve[0]["accuracy"], always_offload_accuracy=curve[-1]["accuracy"],
               policy_threshold=0.9, policy_accuracy=pick["accuracy"], offload_rate=pick["offload_rate"],
               local_latency_ms=round(local_ms, 4), offload_rtt_ms=round(rtt_ms, 3), curve=curve,
               digits_feature_bytes_ratio=round(feat_b / raw_b, 3), digits_feature_payload_ratio=round(payload_ratio, 3),
               digits_request_bytes_raw=raw_b, digits_request_bytes_features=feat_b,
               throughput_1_2_4_workers=[tput[1], tput[2], tput[4]], cores=os.cpu_count())
    print(f"request bytes: features {feat_b} B vs raw {raw_b} B (ratio {feat_b / raw_b:.2f}; payload alone "
          f"{payload_ratio:.2f}); round trip {rtt_ms:.2f} ms")
    shutil.rmtree(work, ignore_errors=True)
    fig.update(img)
    dl = deadline_figures(a.quick)
    fig.update(deadline_met_fraction=dl["deadline_met_fraction"], deadline_met_naive=dl["deadline_met_naive"],
               deadline=dl)
    fig.update(wall_s=round(time.perf_counter() - t_bench, 1), loadavg_1m=round(os.getloadavg()[0], 2))
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
