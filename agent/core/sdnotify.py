"""systemd's notification protocol (sd_notify), without libsystemd: one datagram per state.

``NOTIFY_SOCKET`` names an AF_UNIX datagram socket: an absolute path, or a name starting with
``@`` for the Linux abstract namespace (the ``@`` stands for a leading NUL byte). Outside
systemd the variable is unset and every call is a cheap no-op that returns False, so the agent
calls these unconditionally.

Two ways in: the module-level helpers (``ready()``, ``status()``, ``watchdog()``,
``stopping()``, ``notify()``) use one process-wide ``Notifier`` for the current
``NOTIFY_SOCKET``; a ``Notifier(address)`` object is for code (and tests) that wants its own.
A failed send is reported as False and never raised: a daemon must not die because systemd
went away.
"""
from __future__ import annotations

import os
import socket
import threading

# sd_notify datagrams are small; systemd reads at most a few KiB per message (PIPE_BUF-ish).
MAX_STATE_BYTES = 4096


def _target(address: str) -> str | None:
    """The socket address to send to, or None if ``address`` is not one systemd would use."""
    if address.startswith("@") and len(address) > 1:
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    return None  # relative paths and junk: sd_notify(3) ignores them too


class Notifier:
    """One AF_UNIX datagram socket to systemd; thread-safe (sendto on a datagram socket is atomic)."""

    def __init__(self, address: str | None = None) -> None:
        addr = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.address = addr or None
        self._target = _target(addr) if addr else None
        self._sock: socket.socket | None = None
        if self._target is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        """Send ``state`` (newline-separated ``KEY=value`` lines); True if the datagram left."""
        if self._sock is None:
            return False
        data = state.encode("utf-8", "replace")[:MAX_STATE_BYTES]
        try:
            self._sock.sendto(data, self._target)
        except OSError:
            self.failed += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1" + (f"\nSTATUS={_one_line(status)}" if status else ""))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    # A newline would start a new KEY=value assignment: a status text must not inject one.
    return " ".join(str(text).splitlines())


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings: half of the unit's ``WatchdogSec``, or None when not watched.

    systemd sets ``WATCHDOG_USEC`` (the full timeout) and ``WATCHDOG_PID`` (whom it watches);
    a child that inherited them is not the watched process and gets None (sd_watchdog_enabled
    does the same). Pinging at half the timeout is systemd's own advice.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid:
        if not pid.isdigit() or int(pid) != os.getpid():
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return max(value / 1e6 / 2, 0.01)  # a floor keeps a silly WatchdogSec from busy-looping the pinger


_shared: Notifier | None = None
_shared_lock = threading.Lock()


def _default() -> Notifier:
    """The process-wide notifier, re-made if NOTIFY_SOCKET changed (tests, re-exec)."""
    global _shared
    addr = os.environ.get("NOTIFY_SOCKET") or None
    with _shared_lock:
        if _shared is None or _shared.address != addr:
            if _shared is not None:
                _shared.close()
            _shared = Notifier(addr or "")
        return _shared


def notify(state: str) -> bool:
    """Send one raw sd_notify state; False (and nothing happens) when not under systemd."""
    return _default().notify(state)


def ready(status: str = "") -> bool:
    return _default().ready(status)


def status(msg: str) -> bool:
    return _default().status(msg)


def watchdog() -> bool:
    return _default().watchdog()


def stopping(status: str = "") -> bool:
    return _default().stopping(status)
