"""What the board looks like: capabilities once, health on every telemetry tick.

psutil does the reading; this module only picks the fields a fleet operator needs
and rounds them so telemetry stays small (cellular bytes cost money).
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any

import psutil

_PROC = psutil.Process()
_PROC.cpu_percent(None)  # prime: the first call always returns 0.0
psutil.cpu_percent(None)


def capabilities(runtimes: list[str]) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    return {
        "runtimes": runtimes,
        "cores": psutil.cpu_count(logical=True) or 1,
        "memory_mb": round(vm.total / 2**20),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _temperature_c() -> float | None:
    """Hottest sensor on the board, or None where there is none (VMs, most x86 CI)."""
    try:
        temps = psutil.sensors_temperatures()  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return None
    best: float | None = None
    for entries in temps.values():
        for e in entries:
            if e.current is not None and (best is None or e.current > best):
                best = e.current
    return round(best, 1) if best is not None else None


def health(disk_path: str, started_monotonic: float) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    try:
        du = psutil.disk_usage(disk_path)
        disk = {"path": disk_path, "used_percent": du.percent, "free_mb": round(du.free / 2**20)}
    except OSError as exc:
        disk = {"path": disk_path, "error": exc.strerror or str(exc)}
    try:
        load1, load5, load15 = os.getloadavg()
    except OSError:
        load1 = load5 = load15 = 0.0
    mem = _PROC.memory_info()
    return {
        "cpu_percent": psutil.cpu_percent(None),
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "mem_used_percent": vm.percent,
        "mem_available_mb": round(vm.available / 2**20),
        "disk": disk,
        "temperature_c": _temperature_c(),
        "uptime_s": round(time.time() - psutil.boot_time()),
        "agent_uptime_s": round(time.monotonic() - started_monotonic, 1),
        "rss_mb": round(mem.rss / 2**20, 1),
        "agent_cpu_percent": round(_PROC.cpu_percent(None), 1),
    }
