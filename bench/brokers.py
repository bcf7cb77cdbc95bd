"""A real Mosquitto on a free loopback port for the benchmarks (shared by bench/*.py)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    exe = shutil.which("mosquitto")
    return exe or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def start_mosquitto(work: Path, extra_conf: str = "") -> tuple[subprocess.Popen, int]:
    """Start Mosquitto (persistence off) and wait until it listens; the caller terminates it."""
    exe = mosquitto_binary()
    if exe is None:
        raise FileNotFoundError("mosquitto is not installed (apt-get install -y mosquitto)")
    port = free_port()
    conf = work / f"mosquitto-{port}.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"
                    + ("user root\n" if os.geteuid() == 0 else "") + extra_conf)
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    return proc, port
