"""Deadline scheduling across offload workers (DEMS-A) vs today's shared-subscription offload.

Two workers serve the same model (service time emulated at ``SERVICE_MS`` so that the figure
measures scheduling, not the shared machine's CPU); an open-loop Poisson load of
``LOAD`` × one worker's capacity — it saturates one worker — with a ``DEADLINE_MS`` budget per
request; halfway, one worker becomes 5× slower. A deadline is *met* when the requester has the
worker's answer before its deadline (a local answer after a drop, a refusal or a timeout is
not met). Both runs use the same real Mosquitto, the same bundle and the same load:

* ``scheduler`` — ``controller.offload.worker.OffloadWorker`` (EDF queue, drop-at-once replies,
  work stealing, retained queue estimates) and a board that routes with
  ``agent.offload.routing.WorkerRouter`` to each worker's own topic;
* ``naive`` — today's path: every request on the shared subscription, workers serve in arrival
  order and skip only what is already past its deadline, the board's one RTT estimator decides.

Never fails on a number; ``python bench/offload_sched.py [--quick]`` prints one JSON line last.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
logging.disable(logging.WARNING)

from brokers import start_mosquitto  # noqa: E402

from agent.offload.policy import OFFLOAD, OffloadPolicy, RttEstimator, decide  # noqa: E402
from agent.offload.routing import WorkerRouter  # noqa: E402
from controller.config import load_config  # noqa: E402
from controller.link import make_link  # noqa: E402
from controller.modeltools.example import build_example  # noqa: E402
from controller.offload.worker import OffloadModel, OffloadWorker, WorkerOptions  # noqa: E402
from protocol.binary import decode_frame, encode_frame  # noqa: E402
from protocol.bundle import load_bundle  # noqa: E402
from protocol.envelope import Envelope, decode, encode  # noqa: E402
from protocol.offload import shared  # noqa: E402

SERVICE_MS = 40.0
DEADLINE_MS = 400.0
LOAD = 0.85          # × one worker's capacity (1000 / SERVICE_MS requests/s)
SLOW = 5.0
BASE = "edgefleet/v1"


class NaiveWorker:
    """Today's worker, kept here as the baseline: the shared subscription, arrival order, a
    request skipped only when already past ``deadline_ts``, answered however late it is."""

    def __init__(self, cfg, bundle: Path, wid: str) -> None:
        self.cfg, self.id = cfg, wid
        self.model = OffloadModel(load_bundle(bundle))
        self.slowdown = 1.0

    async def run(self, stop: asyncio.Event, ready) -> None:
        link = make_link(self.cfg, self.id, subscriptions=[])
        await link.start()
        await link.wait_connected(15)
        link.subscribe(shared(f"{BASE}/offload/req"), 1)
        ready()
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                msg = await asyncio.wait_for(link.messages.get(), 0.2)
            except asyncio.TimeoutError:
                continue
            frame = decode_frame(msg.payload)
            env = frame.envelope
            if time.time() > float(env.body["deadline_ts"]):
                body = {"ok": False, "error": "deadline passed before the worker got to it", "worker": self.id}
            else:
                t0 = time.perf_counter()
                label, conf = await loop.run_in_executor(None, self._compute, frame.tensors["x"])
                body = {"ok": True, "label": label, "confidence": round(conf, 6), "worker": self.id,
                        "service_ms": round((time.perf_counter() - t0) * 1000, 3)}
            link.publish(env.reply_to, encode(Envelope(kind="offload.reply", sender=self.id, body=body,
                                                       corr=env.corr)), 1)
        await link.stop()

    def _compute(self, x):
        t0 = time.perf_counter()
        out = self.model.answer("raw", x, {})
        took = time.perf_counter() - t0
        time.sleep(max(0.0, max(took, SERVICE_MS / 1000) * self.slowdown - took))
        return out


class Board:
    """The requester: an open-loop load, one paho client, the agent's own decision code."""

    def __init__(self, port: int, xs: np.ndarray, routed: bool) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from protocol.mqttlink import set_nodelay

        self.xs, self.routed = xs, routed
        self.router = WorkerRouter()
        self.rtt = RttEstimator()
        self.policy = OffloadPolicy(enabled=True, threshold=1.0, mode="raw", deadline_ms=DEADLINE_MS, margin_ms=1.0)
        self.lock = threading.Lock()
        self.sent: dict[str, tuple[float, str | None]] = {}
        self.expired: set[str] = set()
        self.rtts: list[float] = []
        self.last_attempt = 0.0
        self.why: dict[str, int] = {}
        self.counts = {"requests": 0, "met": 0, "offloaded": 0, "local_decided": 0, "dropped_by_worker": 0,
                       "timeouts": 0, "late_replies": 0, "messages_out": 0, "messages_in": 0}
        self.reply = f"{BASE}/dev/bench-board/reply/offload"
        c = self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-board-{os.getpid()}-{routed}",
                                      protocol=mqtt.MQTTv5)
        c.on_socket_open = lambda cl, ud, sock: set_nodelay(sock)
        c.on_message = self._on_message
        c.connect("127.0.0.1", port)
        c.subscribe(self.reply, 1)
        c.subscribe(f"{BASE}/offload/workers/+", 0)
        c.loop_start()

    def _on_message(self, cl, ud, m) -> None:
        now = time.monotonic()
        with self.lock:
            self.counts["messages_in"] += 1
            if m.topic.startswith(f"{BASE}/offload/workers/"):
                wid = m.topic.rsplit("/", 1)[1]
                self.router.on_status(wid, dict(decode(m.payload).body) if m.payload else None, now)
                return
            env = decode(m.payload)
            got = self.sent.pop(env.corr, None)
            if got is None:
                if env.corr in self.expired:
                    self.counts["late_replies"] += 1
                return
            t0, wid = got
            rtt = (now - t0) * 1000
            who = wid or env.body.get("worker")
            if self.routed and who:
                self.router.on_reply(who, rtt, env.body, now)
            if env.body.get("ok"):
                self.rtts.append(rtt)
                self.rtt.observe(rtt)
                if rtt <= DEADLINE_MS:
                    self.counts["met"] += 1
            else:
                self.counts["dropped_by_worker"] += 1

    def send(self, i: int) -> None:
        now = time.monotonic()
        with self.lock:
            self.counts["requests"] += 1
            self._expire(now)
            if self.routed:
                route, why = self.router.choose("raw", None, 64, DEADLINE_MS - self.policy.margin_ms, now)
                go, topic, wid = route is not None, route.topic if route else "", route.worker if route else None
            else:
                d = decide(0.0, 0.0, self.policy, self.rtt, True)
                # today's board also probes once every 5 s when its estimate says "too slow"
                go, topic, wid = d.path == OFFLOAD or now - self.last_attempt >= 5.0, f"{BASE}/offload/req", None
            if not go:
                self.counts["local_decided"] += 1
                if self.routed:
                    key = why.split(" ~")[0].split(" (")[0]
                    self.why[key] = self.why.get(key, 0) + 1
                return
            corr = f"r{i}"
            self.last_attempt = now
            self.sent[corr] = (now, wid)
            if wid:
                self.router.on_sent(wid)
            self.counts["offloaded"] += 1
            self.counts["messages_out"] += 1
        body = {"mode": "raw", "deadline_ts": time.time() + DEADLINE_MS / 1000, "budget_ms": DEADLINE_MS,
                "model": "digits"}
        env = Envelope(kind="offload.request", sender="bench-board", body=body, reply_to=self.reply, corr=corr)
        self.client.publish(topic, encode_frame(env, {"x": self.xs[i % len(self.xs)]}), 1)

    def _expire(self, now: float) -> None:
        for corr, (t0, wid) in list(self.sent.items()):
            if (now - t0) * 1000 > DEADLINE_MS:
                del self.sent[corr]
                self.expired.add(corr)
                self.counts["timeouts"] += 1
                if wid and self.routed:
                    self.router.on_timeout(wid, now)
                elif not self.routed:
                    self.rtt.timeout_penalty(DEADLINE_MS)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def run_mode(port: int, bundle: Path, xs: np.ndarray, routed: bool, seconds: float, seed: int) -> dict:
    cfg = load_config(None, {"mqtt": {"broker": f"mqtt://127.0.0.1:{port}"}})
    tag = "s" if routed else "n"
    if routed:
        workers = [OffloadWorker(cfg, bundle, f"{tag}w{i}", options=WorkerOptions(emulate_service_ms=SERVICE_MS))
                   for i in range(2)]
    else:
        workers = [NaiveWorker(cfg, bundle, f"{tag}w{i}") for i in range(2)]
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    ready = threading.Semaphore(0)

    async def main():
        await asyncio.gather(*(w.run(stop, ready.release) for w in workers))

    th = threading.Thread(target=lambda: loop.run_until_complete(main()), name="bench-workers", daemon=True)
    th.start()
    for _ in workers:
        ready.acquire(timeout=30)
    board = Board(port, xs, routed)
    time.sleep(1.0)                                   # statuses retained and seen
    rng = np.random.default_rng(seed)
    rate = LOAD * 1000.0 / SERVICE_MS
    t0 = time.monotonic()
    t_next, i, slowed = t0, 0, False
    while True:
        now = time.monotonic()
        if now - t0 >= seconds:
            break
        if not slowed and now - t0 >= seconds / 2:
            loop.call_soon_threadsafe(setattr, workers[0], "slowdown", SLOW)
            slowed = True
        if now >= t_next:
            board.send(i)
            i += 1
            t_next += rng.exponential(1.0 / rate)
        else:
            time.sleep(min(t_next - now, 0.005))
    time.sleep(DEADLINE_MS / 1000 * 3)                # the last answers (late ones too)
    with board.lock:
        board._expire(time.monotonic() + DEADLINE_MS)
        counts = dict(board.counts)
    board.close()
    loop.call_soon_threadsafe(stop.set)
    th.join(10)
    if board.rtts:
        counts["rtt_ms_p50_p95"] = [round(float(np.percentile(board.rtts, q)), 1) for q in (50, 95)]
    if board.why:
        counts["local_why"] = board.why
    counts["met_fraction"] = round(counts["met"] / max(1, counts["requests"]), 4)
    if routed:
        counts["worker_drops"] = {w.id: dict(w.dropped) for w in workers}
        counts["stolen"] = {w.id: dict(w.stolen) for w in workers}
    return counts


def cached_bundle() -> Path:
    """A small digits bundle, built once under ~/.cache/edgefleet (checked by load_bundle on reuse)."""
    from protocol.bundle import BundleError

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgefleet" / "offload-sched-digits"
    try:
        load_bundle(cache)
        return cache
    except BundleError:
        pass
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    build_example(tmp, "small", epochs=1)
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)
    return cache


def deadline_figures(quick: bool, bundle: str | Path | None = None) -> dict:
    """deadline_met_fraction (scheduler) vs deadline_met_naive, same broker, bundle and load.

    ``bundle``: a digits bundle to serve (bench/offload.py passes the one it built); by default
    a small one is built here (the model only has to answer: the service time is emulated)."""
    seconds = 8.0 if quick else 30.0
    work = Path(tempfile.mkdtemp(prefix="edgefleet-sched-"))
    t_start = time.monotonic()
    try:
        if bundle is None:
            bundle = cached_bundle()
        print(f"bundle ready in {time.monotonic() - t_start:.1f} s", file=sys.stderr)
        xs = np.random.default_rng(0).uniform(0, 16, (64, 64)).astype(np.float32)
        broker, port = start_mosquitto(work)
        try:
            sched = run_mode(port, Path(bundle), xs, True, seconds, 1)
            naive = run_mode(port, Path(bundle), xs, False, seconds, 1)
        finally:
            broker.terminate()
            broker.wait(5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"deadline_met_fraction": sched["met_fraction"], "deadline_met_naive": naive["met_fraction"],
            "deadline_ms": DEADLINE_MS, "service_ms": SERVICE_MS, "load_of_one_worker": LOAD, "slowdown": SLOW,
            "seconds_per_run": seconds, "scheduler": sched, "naive": naive,
            "wall_s": round(time.monotonic() - t_start, 1), "cores": os.cpu_count(), "loadavg_1m": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 s per run (< 30 s in all)")
    a = ap.parse_args()
    fig = deadline_figures(a.quick)
    for mode in ("scheduler", "naive"):
        c = fig[mode]
        print(f"{mode}: {c['met']}/{c['requests']} deadlines met ({c['met_fraction']:.1%}); offloaded {c['offloaded']}, "
              f"decided local {c['local_decided']}, dropped by a worker {c['dropped_by_worker']}, "
              f"timeouts {c['timeouts']}, late replies {c['late_replies']}")
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
