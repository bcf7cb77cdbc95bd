"""Federated rounds across sites (issue 19): boards that speak the real protocol, and a relay process.

``SimBoard`` is a lightweight board on a real broker: retained online state, telemetry saying it
has labelled data, and on each ``fl.task`` a seeded delta (``fl.update``, raw) sent again every
``resend_s`` until the controller's ``fl.ack`` — the agent's own promise. It remembers every delta
it sent, so a test computes the flat FedAvg by hand. ``move(port)`` reconnects it at another site.

``start_relay`` runs the real relay role (``edge-agent run``, ``[relay]``, only its fl component) in its
own process: killable with SIGKILL at any point.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.envelope import Envelope, decode, encode

ROOT = Path(__file__).resolve().parents[2]
T = "edgefleet/v1"


class SimBoard:
    def __init__(self, port: int, dev: str, samples: int = 100, seed: int = 0, resend_s: float = 2.0,
                 site: str | None = None) -> None:
        self.dev, self.samples, self.seed, self.resend_s, self.site = dev, samples, seed, resend_s, site
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
                kind="state", sender=self.dev, body={"status": "online", "group": "default",
                                                     **({"site": self.site} if self.site else {})})), 1, retain=True)
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

    def move(self, port: int, site: str | None = None, left: "Callable[[], None] | None" = None) -> None:
        """The board leaves its site (its will says offline there) and joins ``site`` at ``port``.

        ``left`` runs in between (e.g. wait until the centre saw it offline): the old site's
        "offline" and the new site's "online" cross different bridges, so nothing orders them at
        the centre (the registry does not order states by their timestamps yet)."""
        old = self.client
        old.publish(f"{T}/dev/{self.dev}/state", encode(Envelope(kind="state", sender=self.dev,
                                                                 body={"status": "offline"})), 1, retain=True)
        old.disconnect()
        old.loop_stop()
        if left is not None:
            left()
        self.site = site
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
                log: Path | None = None) -> subprocess.Popen:
    """The real relay role (``edge-agent run`` with ``[relay]``), running only its fl component."""
    cfg = tmp / f"{relay_id}.toml"
    cfg.write_text(f'[device]\nid = "{relay_id}"\nsite = "{site}"\n[mqtt]\nbroker = "{site_url}"\nkeepalive = 5\n'
                   f'min_backoff_s = 0.2\nmax_backoff_s = 1.0\n[state]\ndir = "{tmp / ("relay-" + site)}"\n'
                   f'[relay]\nenabled = true\nupstream = "{upstream_url}"\nretry_s = 1.0\ncomponents = ["fl"]\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                            stdout=open(log or tmp / f"relay-{site}.log", "ab"), stderr=subprocess.STDOUT,
                            env=env, cwd=ROOT)
