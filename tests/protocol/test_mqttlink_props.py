"""The link's fast MQTT 5 properties (pure, no I/O): byte for byte what stock paho writes and
reads, the same refusals, and paho's errors still reach the link without per-packet formatting."""
from __future__ import annotations

import logging

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import MQTTException, Properties

from protocol.mqttlink import (_CONTENT_PROPS, FAST_PROPERTIES, BrokerAddress, MqttLink, _content_props,
                               _FastProperties, _reply_props)

RT = "edgefleet/v1/dev/lat-1/reply/fleetctl-0a1b2c3d"


def _stock(kind: str, rt: str | None, corr: bytes | None) -> Properties:
    p = _content_props(kind) if kind != "other" else Properties(PacketTypes.PUBLISH)
    if rt:
        p.ResponseTopic = rt
    if corr:
        p.CorrelationData = corr
    return p


@pytest.mark.parametrize("kind", ["json", "frame", "other"])
@pytest.mark.parametrize("rt,corr", [(RT, None), (None, b"c0ffee"), (RT, b"x" * 300), (RT + "/é", b"\x00\xff")])
def test_reply_props_pack_like_paho(kind, rt, corr):
    fast, stock = _reply_props(kind, rt, corr), _stock(kind, rt, corr)
    assert fast.pack() == stock.pack()
    assert str(fast) == str(stock) and fast.json() == stock.json()
    assert getattr(fast, "CorrelationData", None) == corr


def test_shared_content_props_pack_like_paho():
    for kind in ("json", "frame"):
        assert _CONTENT_PROPS[kind].pack() == _content_props(kind).pack()
    assert _CONTENT_PROPS["other"] is None


def _rich(cls: type) -> Properties:
    p = cls(PacketTypes.PUBLISH)
    p.PayloadFormatIndicator = 1
    p.MessageExpiryInterval = 600
    p.ContentType = "application/json"
    p.ResponseTopic = RT
    p.CorrelationData = b"\x01\x02"
    p.TopicAlias = 7
    p.UserProperty = ("a", "1")
    p.UserProperty = [("b", "2")]
    p.SubscriptionIdentifier = 300
    return p


def test_fast_properties_decode_like_paho():
    wire = _rich(Properties).pack()
    assert _rich(_FastProperties).pack() == wire
    stock, fast = Properties(PacketTypes.PUBLISH), _FastProperties(PacketTypes.PUBLISH)
    stock.unpack(wire)
    fast.unpack(wire)
    assert fast.json() == stock.json() and str(fast) == str(stock)
    assert fast.UserProperty == [("a", "1"), ("b", "2")]
    fast.unpack(b"\x00")                         # a second packet into the same object: cleared first
    assert fast.isEmpty() and not hasattr(fast, "ContentType")


@pytest.mark.parametrize("name,value", [("PayloadFormatIndicator", 2), ("TopicAlias", 0), ("ReceiveMaximum", 70000),
                                        ("SessionExpiryInterval", 5), ("NoSuchThing", 1)])
def test_fast_properties_refuse_what_paho_refuses(name, value):
    with pytest.raises(MQTTException) as stock:
        setattr(Properties(PacketTypes.PUBLISH), name, value)
    with pytest.raises(MQTTException) as fast:
        setattr(_FastProperties(PacketTypes.PUBLISH), name, value)
    assert str(fast.value) == str(stock.value)


def test_fast_properties_installed_in_pahos_decoder():
    from paho.mqtt import _packet

    assert FAST_PROPERTIES and _packet.Properties is _FastProperties


def test_paho_errors_reach_the_link_and_debug_lines_are_not_formatted():
    link = MqttLink("t", BrokerAddress("127.0.0.1", 1))
    log = link._paho_log

    class Loud:
        def __str__(self) -> str:
            raise AssertionError("formatted a debug line")

    log.log(logging.DEBUG, "Received PUBLISH %s", Loud())   # what paho does per packet: never formatted
    assert link._socket_error is None
    log.log(logging.ERROR, "failed to receive on socket: %s", "[Errno 104] Connection reset by peer")
    assert link._socket_error is not None and "Errno 104" in link._socket_error[1]


def test_buffered_reads_serve_paho_the_same_bytes_and_drop_them_with_the_socket():
    """One recv fills the buffer; paho's small reads come out of it in order; a new socket starts
    empty (no byte of the old connection is parsed on the new one)."""
    import socket

    from paho.mqtt.enums import CallbackAPIVersion

    from protocol.mqttlink import _Client

    c = _Client(CallbackAPIVersion.VERSION2, client_id="t")
    a, b = socket.socketpair()
    try:
        b.setblocking(False)
        c._sock = b
        a.sendall(b"\x30\x05hello" * 3)
        got = [c._sock_recv(1), c._sock_recv(1), c._sock_recv(5)]
        assert got == [b"\x30", b"\x05", b"hello"] and c.buffered()
        assert c._sock_recv(100) == b"\x30\x05hello" * 2 and not c.buffered()
        with pytest.raises(BlockingIOError):
            c._sock_recv(1)                      # nothing left anywhere: paho's "try again"
        a.sendall(b"stale")
        assert c._sock_recv(1) == b"s" and c.buffered()
        a2, b2 = socket.socketpair()
        try:
            b2.setblocking(False)
            c._sock = b2                         # a reconnect: the old socket's bytes are not ours
            assert not c.buffered()
            a2.sendall(b"new")
            assert c._sock_recv(3) == b"new"
        finally:
            a2.close()
            b2.close()
    finally:
        c._sock = None
        a.close()
        b.close()
