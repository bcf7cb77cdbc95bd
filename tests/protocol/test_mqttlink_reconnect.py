"""``reconnect_with``: what paho held in flight is acknowledged before the old client goes (a new
client would not re-send it), and the link comes back with its subscriptions."""
from __future__ import annotations

import asyncio

from protocol.mqttlink import MqttLink, TlsFiles, parse_broker_url
from tests.helpers.waiting import Probe, wait_for


def test_reconnect_with_loses_nothing_in_flight(mosquitto):
    probe = Probe(mosquitto.port, subscribe=("swap/#",)).wait_subscribed()

    async def main() -> tuple[int, int, bool]:
        link = MqttLink("swap-test", parse_broker_url(mosquitto.url), subscriptions=[("swap-in", 1)])
        await link.start()
        assert await link.wait_connected(10)
        sent = sum(link.publish(f"swap/{i}", b"x" * 2000, 1) for i in range(300))
        await link.reconnect_with(TlsFiles())
        refused_meanwhile = link.publish("swap/late", b"y", 1)   # the caller's outbox takes it
        assert await link.wait_connected(10)
        probe.publish("swap-in", b"hello")                       # subscriptions carried over
        msg = await asyncio.wait_for(link.messages.get(), 10)
        await link.stop()
        return sent, link.connects, refused_meanwhile or msg.payload != b"hello"

    sent, connects, bad = asyncio.run(main())
    assert sent == 300 and connects == 2 and not bad
    wait_for(lambda: len(probe.seen(lambda t, p: t.startswith("swap/") and t != "swap/late")) == 300, 10,
             what="all 300 in-flight publishes")
    probe.close()
