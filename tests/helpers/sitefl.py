"""Federated rounds across sites (issue 19): boards that speak the real protocol, and a relay process.

``SimBoard`` is a lightweight board on a real broker: retained online state, telemetry saying it
has labelled data, and on each ``fl.task`` a seeded delta (``fl.update``, raw) sent again every
``resend_s`` until the controller's ``fl.ack`` — the agent's own promise. It remembers every delta
it sent, so a test computes the flat FedAvg by hand. ``move(port)`` reconnects it at another site.

``start_relay`` runs the relay's fl component in its own process (``python -m tests.helpers.sitefl``)
with a site link and an upstream link: killable with SIGKILL at any point.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.envelope import Envelope, decode, encode

ROOT = Path(__file__).resolve().parents[2]
T = "edgefleet/v1"


class SimBoard:
    def __init__(self, port: int, dev: str, samples: int = 100, seed: int = 0, resend_s: float = 2.0) -> None:
        self.dev, self.samples, self.seed, self.resend_s = dev, samples, seed, resend_s
        #: while set to an unset Event, the board "trains": it answers a task once the event is set
        self.gate: threading.Event | None = None
        self.sent: dict[tuple[str, int], dict[str, np.ndarray]] = {}
        self.acks: list[dict] = []
        self.tasks: list[dict] = []
        self._unacked: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.client = None
        self.connect(port)
        self._t = threading.Thread(target=self._resender, daemon=True)
        self._t.start()

    def connect(self, port: int) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.dev, protocol=mqtt.MQTTv5)
        ready = threading.Event()

        def on_connect(client, userdata, flags, rc, props=None):
            client.subscribe([(f"{T}/dev/{self.dev}/cmd", 1), (f"{T}/dev/{self.dev}/bin", 1)])
            client.publish(f"{T}/dev/{self.dev}/state", encode(Envelope(
                kind="state", sender=self.dev, body={"status": "online", "group": "default"})), 1, retain=True)
            client.publish(f"{T}/dev/{self.dev}/telemetry", encode(Envelope(
                kind="telemetry", sender=self.dev, body={"seq": 1, "interval_s": 5, "cpu_percent": 1.0,
                                                         "learning": {"labelled_samples": self.samples}})), 1)
            ready.set()

        c.on_connect, c.on_message = on_connect, self._on_message
        c.will_set(f"{T}/dev/{self.dev}/state", encode(Envelope(kind="state", sender=self.dev,
                                                                body={"status": "offline"})), 1, retain=True)
        c.connect("127.0.0.1", port, keepalive=5)
        c.loop_start()
        if not ready.wait(15):
            raise TimeoutError(f"{self.dev} could not connect")
        self.client = c

    def move(self, port: int) -> None:
        """The board leaves its site (its will says offline there) and joins the site at ``port``."""
        old = self.client
        old.publish(f"{T}/dev/{self.dev}/state", encode(Envelope(kind="state", sender=self.dev,
                                                                 body={"status": "offline"})), 1, retain=True)
        old.disconnect()
        old.loop_stop()
        self.connect(port)

    def delta_for(self, run_id: str, round_no: int, shapes: dict) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, round_no, len(run_id)])
        return {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in sorted(shapes.items())}

    def _on_message(self, client, userdata, m):
        if is_frame(m.payload):
            f = decode_frame(m.payload)
            if f.envelope.kind != "fl.task":
                return
            b = f.envelope.body
            self.tasks.append(dict(b))
            key = (b["run_id"], int(b["round"]))
            if key in self.sent:
                return
            delta = self.delta_for(b["run_id"], key[1], {k: v.shape for k, v in f.tensors.items()})
            up = Envelope(kind="fl.update", sender=self.dev, body={
                "run_id": b["run_id"], "round": key[1], "base_version": b["base_version"],
                "num_samples": self.samples, "encoding": "raw", "train_loss": 0.5})
            payload = encode_frame(up, delta)
            with self._lock:
                self.sent[key] = delta

            def answer(gate=self.gate):
                if gate is not None:
                    gate.wait(120)
                with self._lock:
                    self._unacked[key] = payload
                self.client.publish(f"{T}/dev/{self.dev}/data/fl", payload, 1)
            if self.gate is None:
                answer()
            else:
                threading.Thread(target=answer, daemon=True).start()
            return
        env = decode(m.payload)
        if env.kind == "fl.ack":
            with self._lock:
                self.acks.append(dict(env.body))
                self._unacked.pop((env.body["run_id"], int(env.body["round"])), None)

    def _resender(self) -> None:
        last_tel = last_send = time.monotonic()
        while not self._stop.wait(0.2):   # resend_s may change while it runs
            now = time.monotonic()
            if now - last_tel > 10 and self.client is not None:   # stay "recently seen"
                last_tel = now
                self.client.publish(f"{T}/dev/{self.dev}/telemetry", encode(Envelope(
                    kind="telemetry", sender=self.dev, body={"seq": int(time.time()), "interval_s": 5,
                                                             "cpu_percent": 1.0,
                                                             "learning": {"labelled_samples": self.samples}})), 1)
            if now - last_send < self.resend_s:
                continue
            last_send = now
            with self._lock:
                items = list(self._unacked.values())
            for payload in items:
                if self.client is not None:
                    self.client.publish(f"{T}/dev/{self.dev}/data/fl", payload, 1)

    def close(self) -> None:
        self._stop.set()
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()


def flat_fedavg(boards: list[SimBoard], run_id: str, round_no: int, only: set[str] | None = None) -> dict:
    """The flat sample-weighted mean of the deltas the boards sent (float64), by hand."""
    got = [(b.samples, b.sent[(run_id, round_no)]) for b in boards
           if (run_id, round_no) in b.sent and (only is None or b.dev in only)]
    total = sum(n for n, _ in got)
    return {k: sum(n * np.asarray(d[k], np.float64) for n, d in got) / total for k in got[0][1]}


def start_relay(tmp: Path, relay_id: str, site: str, site_url: str, upstream_url: str,
                log: Path | None = None, resend_s: float = 3.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "RELAY_RESEND_S": str(resend_s)}
    args = [sys.executable, "-m", "tests.helpers.sitefl", relay_id, site, site_url, upstream_url,
            str(tmp / f"relay-{site}")]
    return subprocess.Popen(args, stdout=open(log or tmp / f"relay-{site}.log", "ab"), stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)


async def _relay_main(relay_id: str, site: str, site_url: str, upstream_url: str, state: str) -> None:
    """The fl component on two real links, routed like the relay service routes (every matching filter)."""
    import logging
    from collections import Counter

    from agent.relay import RelayContext
    from agent.relay.fl import FederatedRelay
    from protocol.mqttlink import MqttLink, parse_broker_url
    from protocol.topics import Topics

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log = logging.getLogger("relay")
    # persistent on both legs: what boards publish while the relay is down waits for it at the site broker
    site_link = MqttLink(f"{relay_id}-site", parse_broker_url(site_url), min_backoff=0.2, max_backoff=1.0,
                         persistent=True)
    up_link = MqttLink(relay_id, parse_broker_url(upstream_url), min_backoff=0.2, max_backoff=1.0, persistent=True)
    routes: dict[int, list] = {id(site_link): [], id(up_link): []}

    def adder(link):
        def add(flt, handler):
            routes[id(link)].append((flt, handler))
            link.subscribe(flt, 1)
        return add

    from paho.mqtt.client import topic_matches_sub

    async def route(link):
        while True:
            msg = await link.messages.get()
            for flt, h in routes[id(link)]:
                if topic_matches_sub(flt, msg.topic):
                    try:
                        await h(msg)
                    except Exception:  # noqa: BLE001
                        log.exception("handler %s failed", flt)

    counters: Counter = Counter()
    ctx = RelayContext(site_name=site, relay_id=relay_id, topics=Topics("edgefleet"), site=site_link,
                       upstream=up_link, state_dir=Path(state), log=log, counters=counters,
                       on_site=adder(site_link), on_upstream=adder(up_link))
    Path(state).mkdir(parents=True, exist_ok=True)
    await site_link.start()
    await up_link.start()
    comp = FederatedRelay(resend_s=float(os.environ.get("RELAY_RESEND_S", "3")))
    tasks = [asyncio.create_task(route(site_link)), asyncio.create_task(route(up_link)),
             asyncio.create_task(comp.run(ctx))]
    await site_link.wait_connected(30)
    await up_link.wait_connected(30)
    print("RELAY READY", flush=True)
    while True:
        await asyncio.sleep(1.0)
        tmp = Path(state) / "counters.json.tmp"
        tmp.write_text(json.dumps(dict(counters)))
        os.replace(tmp, Path(state) / "counters.json")


if __name__ == "__main__":
    asyncio.run(_relay_main(*sys.argv[1:6]))
