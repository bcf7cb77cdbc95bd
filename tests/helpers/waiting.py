"""Wait on a condition instead of sleeping, and a plain MQTT client that records what it sees."""
from __future__ import annotations

import asyncio
import os
import threading
import time


def wait_for(pred, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    """Poll ``pred`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last value {last!r})")


async def until(pred, timeout: float = 10.0, what: str = "condition"):
    """``wait_for`` on the event loop: polls ``pred`` without blocking the loop."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Probe:
    """A plain paho client for tests: records what it sees, publishes what it is told.

    ``wait(pred)`` blocks until a recorded message matches (woken by each arrival, no polling)."""

    def __init__(self, port: int, subscribe: tuple[str, ...] = (), client_id: str | None = None,
                 protocol: str = "5") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.messages: list[tuple[str, bytes, bool]] = []
        self.content_types: dict[str, set[str | None]] = {}
        self._cond = threading.Condition()
        self._subs = subscribe
        self._subscribed = threading.Event()
        self._pending_subs: set[int] = set()
        proto = mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{os.getpid()}-{id(self)}",
                                  protocol=proto)
        self._connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise TimeoutError("probe could not connect")

    def _on_connect(self, client, userdata, flags, rc, props=None):
        with self._cond:
            for s in self._subs:
                self._pending_subs.add(client.subscribe(s, 1)[1])
            if not self._pending_subs:
                self._subscribed.set()
        self._connected.set()

    def _on_subscribe(self, client, userdata, mid, reason_codes, props=None):
        with self._cond:
            self._pending_subs.discard(mid)
            if not self._pending_subs:
                self._subscribed.set()

    def _on_message(self, client, userdata, m):
        with self._cond:
            self.messages.append((m.topic, bytes(m.payload), bool(m.retain)))
            # MQTT 5 content type per topic, as the publisher set it (None when unset)
            self.content_types.setdefault(m.topic, set()).add(getattr(getattr(m, "properties", None),
                                                                      "ContentType", None))
            self._cond.notify_all()

    def wait_subscribed(self, timeout: float = 10.0) -> "Probe":
        """Block until the broker confirmed every subscription (nothing published later is missed)."""
        if not self._subscribed.wait(timeout):
            raise TimeoutError("probe subscriptions not confirmed")
        return self

    def seen(self, pred=lambda t, p: True) -> list[tuple[str, bytes, bool]]:
        with self._cond:
            return [m for m in self.messages if pred(m[0], m[1])]

    def wait(self, pred=lambda t, p: True, n: int = 1, timeout: float = 10.0, what: str = "messages"):
        """The matching messages once there are at least ``n`` of them."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hits = [m for m in self.messages if pred(m[0], m[1])]
                if len(hits) >= n:
                    return hits
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what} ({len(hits)} of {n})")
                self._cond.wait(left)

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos, retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
