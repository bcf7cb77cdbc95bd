"""MqttLink.publish_acked: "sent" means the broker's PUBACK resolved the future — tested on a real
Mosquitto, including one that is stopped with the message unacknowledged."""
from __future__ import annotations

import asyncio
import os
import signal

from protocol.mqttlink import MqttLink, parse_broker_url


def link_for(broker, client_id="ack-test"):
    return MqttLink(client_id, parse_broker_url(broker.url), protocol="5", min_backoff=0.1, max_backoff=0.5)


def test_the_future_resolves_on_the_brokers_ack(mosquitto):
    async def main():
        link = link_for(mosquitto)
        await link.start()
        assert await link.wait_connected(30)
        futs = [link.publish_acked("t/ack", b"x" * 100, 1) for _ in range(50)]
        done = await asyncio.wait_for(asyncio.gather(*futs), 30)
        await link.stop()
        return done, link._pending

    done, pending = asyncio.run(main())
    assert done == [True] * 50 and pending == {}


def test_not_connected_is_false_at_once_and_a_frozen_broker_never_acks(mosquitto):
    async def main():
        link = link_for(mosquitto)
        assert (await link.publish_acked("t/ack", b"x")) is False         # not started: refused, not pending
        await link.start()
        assert await link.wait_connected(30)
        assert await link.publish_and_wait("t/ack", b"warm", 1, timeout=30)
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)                         # the broker takes bytes, acks nothing
        try:
            fut = link.publish_acked("t/ack", b"held")
            await asyncio.sleep(0)
            unacked = not fut.done()
            timed_out = not await link.publish_and_wait("t/ack", b"held-2", 1, timeout=0.5)
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        acked_later = await asyncio.wait_for(fut, 30)                       # thawed: the PUBACK arrives
        await link.stop()
        return unacked, timed_out, acked_later

    unacked, timed_out, acked_later = asyncio.run(main())
    assert unacked and timed_out and acked_later is True


def test_stopping_the_link_fails_what_was_never_acknowledged(mosquitto):
    async def main():
        link = link_for(mosquitto)
        await link.start()
        assert await link.wait_connected(30)
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            fut = link.publish_acked("t/ack", b"never")
            await link.stop(timeout=0.5)
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)
        return await asyncio.wait_for(fut, 5)

    assert asyncio.run(main()) is False


def test_every_link_socket_has_tcp_nodelay(mosquitto):
    """Nagle + the broker's delayed ACK cost ~40 ms per request/response hop (issue 16): our paho
    socket must have TCP_NODELAY set (it was 0 before on_socket_open set it)."""
    import socket

    async def main():
        link = link_for(mosquitto, "nodelay-test")
        await link.start()
        assert await link.wait_connected(30)
        sock = link._client.socket()
        flag = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await link.stop()
        return flag

    assert asyncio.run(main()) != 0
