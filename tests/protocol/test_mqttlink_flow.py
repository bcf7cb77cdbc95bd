"""Inbound flow control on a real Mosquitto: a slow consumer makes the link stop reading instead of
dropping what the broker handed it, and with manual_ack a message not yet stored is delivered again."""
from __future__ import annotations

import asyncio

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol.mqttlink import MqttLink, parse_broker_url


def publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="flood", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_a_slow_consumer_loses_nothing(tmp_path):
    """The broker holds what the link does not read yet (up to its max_queued_messages, the limit
    the shipped mosquitto.conf raises); the link itself never takes a message it then drops."""
    from tests.helpers.broker import Mosquitto

    n = 3000
    mosquitto = Mosquitto(tmp_path, extra_conf="max_queued_messages 100000\n").start()

    async def main():
        link = MqttLink("slow", parse_broker_url(mosquitto.url), protocol="5", queue_size=16,
                        subscriptions=[("flow/#", 1)])
        await link.start()
        assert await link.wait_connected(30)
        while not link.subscriptions or not await link.publish_and_wait("flow/probe", b"p", 1, timeout=30):
            await asyncio.sleep(0.05)
        pub = publisher(mosquitto.port)
        infos = [pub.publish("flow/x", str(i).encode(), qos=1) for i in range(n)]
        got: list[int] = []
        peak = 0
        while len(got) < n:
            msg = await asyncio.wait_for(link.messages.get(), 60)
            peak = max(peak, link.messages.qsize())
            if msg.topic == "flow/x":
                got.append(int(msg.payload))
            if len(got) % 100 == 0:
                await asyncio.sleep(0.01)     # a consumer slower than the flood
        for i in infos:
            i.wait_for_publish(30)
        pub.loop_stop()
        pub.disconnect()
        dropped = link.dropped_incoming
        await link.stop()
        return got, peak, dropped

    try:
        got, peak, dropped = asyncio.run(main())
    finally:
        mosquitto.stop()
    assert sorted(got) == list(range(n)) and dropped == 0
    assert peak <= 16                                   # the hand-off never holds more than its bound


async def next_on(link: MqttLink, topic: str):
    """The next message on ``topic`` (others, e.g. a late warm-up, are acknowledged and skipped)."""
    while True:
        msg = await asyncio.wait_for(link.messages.get(), 30)
        if msg.topic == topic:
            return msg
        link.ack(msg)


def test_with_manual_ack_what_was_not_stored_comes_again(mosquitto):
    async def main():
        def link():
            return MqttLink("keeper", parse_broker_url(mosquitto.url), protocol="5", persistent=True,
                            manual_ack=True, subscriptions=[("keep/#", 1)])
        first = link()
        await first.start()
        assert await first.wait_connected(30)
        while True:                                          # the subscription is in place once this comes back
            assert await first.publish_and_wait("keep/warm", b"w", 1, timeout=30)
            try:
                warm = await asyncio.wait_for(first.messages.get(), 2)
                first.ack(warm)
                break
            except asyncio.TimeoutError:
                continue
        pub = publisher(mosquitto.port)
        pub.publish("keep/a", b"stored", qos=1).wait_for_publish(30)
        m1 = await next_on(first, "keep/a")
        first.ack(m1)                                        # stored: acknowledged
        # our PUBACK is queued before this PUBLISH: its PUBACK back means the broker has ours
        assert await first.publish_and_wait("other/x", b"x", 1, timeout=30)
        pub.publish("keep/a", b"not-stored", qos=1).wait_for_publish(30)
        m2 = await next_on(first, "keep/a")
        first.kill()                                          # dies before storing m2: no PUBACK, no DISCONNECT
        second = link()
        await second.start()
        assert await second.wait_connected(30)
        again = await next_on(second, "keep/a")
        second.ack(again)
        await second.stop()
        pub.loop_stop()
        pub.disconnect()
        return m1, m2, again

    m1, m2, again = asyncio.run(main())
    assert m1.payload == b"stored" and m2.payload == b"not-stored"
    assert again.payload == b"not-stored"                    # redelivered: nothing taken was lost
