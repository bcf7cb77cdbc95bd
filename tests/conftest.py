"""Shared fixtures: a real Mosquitto on a free loopback port."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.path.exists(cand):
            return cand
    pytest.fail("mosquitto is not installed (apt-get install -y mosquitto); the tests need a real broker")


class Mosquitto:
    """A real Mosquitto process; ``stop()``/``start()`` simulate an outage on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "", persistence: bool = False) -> None:
        self.workdir = workdir
        self.persistence = persistence
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            # started as root, mosquitto would switch to its own user and could not write its log
            # or persistence file into the test's directory
            + ("user root\n" if os.geteuid() == 0 else "")
            + (f"persistence true\npersistence_location {self.workdir}/\n" if self.persistence else "persistence false\n")
            +
            f"log_dest file {self.log}\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            + self.extra_conf)
        self.proc = subprocess.Popen([mosquitto_binary(), "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


class Probe:
    """A plain paho client for tests: records what it sees, publishes what it is told."""

    def __init__(self, port: int, subscribe: tuple[str, ...] = (), client_id: str | None = None,
                 protocol: str = "5") -> None:
        import threading
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subs = subscribe
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{os.getpid()}-{id(self)}",
                                  protocol=proto)
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("probe could not connect")

    def _on_connect(self, client, userdata, flags, rc, props=None):
        for s in self._subs:
            client.subscribe(s, 1)
        self._connected.set()

    def _on_message(self, client, userdata, m):
        with self._lock:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))

    def seen(self, pred=lambda t, p: True) -> list[tuple[str, bytes, bool]]:
        with self._lock:
            return [m for m in self.messages if pred(m[0], m[1])]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos, retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value {last!r})")


@pytest.fixture(scope="session")
def example_bundle(tmp_path_factory):
    """The real example bundle (digits, int8 ONNX backbone + float head), built once per test session."""
    from controller.modeltools.example import build_example

    out = tmp_path_factory.mktemp("bundles") / "digits-1.0.0"
    report = build_example(out, "small", seed=0, epochs=30)
    return out, report


@pytest.fixture(scope="session")
def digits_test():
    from controller.modeltools.example import digits_split

    _, _, x, y = digits_split(0)
    return x, y


def make_plain_bundle(out: Path, model: Path, version: str = "1.0.0", name: str = "plain") -> Path:
    """A backbone-only bundle around a single-graph model (its output is the class scores)."""
    import shutil as _sh

    from protocol.bundle import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    _sh.copy(model, out / model.name)
    write_manifest(out, {"name": name, "version": version,
                         "input": {"name": "input", "shape": [1, 64], "dtype": "float32", "min": 0.0, "max": 16.0},
                         "labels": [str(i) for i in range(10)],
                         "files": {model.name: {"role": "backbone"}}})
    return out


@pytest.fixture(scope="session")
def large_bundle(tmp_path_factory, example_bundle):
    """The offload worker's model: the same backbone as example_bundle, a bigger head."""
    from controller.modeltools.example import build_example

    out = tmp_path_factory.mktemp("bundles") / "digits-large"
    build_example(out, "large", seed=0, epochs=30)
    return out
