"""Free loopback ports and a real Mosquitto on one of them."""
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
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port}")


def mosquitto_binary() -> str:
    for cand in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if cand and os.path.exists(cand):
            return cand
    pytest.fail("mosquitto is not installed (apt-get install -y mosquitto); the tests need a real broker")


def _listens(pid: int, port: int) -> bool:
    import psutil

    try:
        conns = psutil.Process(pid).net_connections("tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


class Mosquitto:
    """A real Mosquitto process; ``stop()``/``start()`` simulate an outage on the same port."""

    def __init__(self, workdir: Path, port: int | None = None, extra_conf: str = "", persistence: bool = False) -> None:
        self.workdir = workdir
        self.persistence = persistence
        self._port_given = port is not None
        self.port = port or free_port()
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> "Mosquitto":
        # a free port can be taken by another test process before the broker binds it: then pick
        # another (unless the test chose the port), and make sure the listener is ours, not theirs
        for _ in range(5):
            if self._start_once():
                return self
            if self._port_given:
                break
            self.port = free_port()
        raise RuntimeError(f"mosquitto did not start on 127.0.0.1:{self.port}: "
                           f"{self.log.read_text() if self.log.exists() else ''}")

    def _start_once(self) -> bool:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "set_tcp_nodelay true\n"
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
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if _listens(self.proc.pid, self.port):
                return True
            time.sleep(0.01)
        self.stop()
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
