"""The site bridge table and its Mosquitto rendering (pure), the site wave planner, the packet counter."""
from __future__ import annotations

import pytest

from controller.rollouts.policy import RolloutConfigError, RolloutPolicy, plan_site_waves
from protocol.sites import RULES, BridgeRule, BridgeSettings, bridge_config, relay_want_topic, rules_for
from tests.helpers.sites import MqttPacketCounter


def topic_lines(conf: str) -> dict[str, tuple[str, int]]:
    out = {}
    for line in conf.splitlines():
        if line.startswith("topic "):
            _, pattern, direction, qos = line.split()
            out[pattern] = (direction, int(qos))
    return out


def test_bridge_config_carries_the_contract_and_keeps_relay_traffic_local():
    conf = bridge_config(BridgeSettings(site="farm-3", centre="centre.example:8883", tls_ca="/etc/ca.pem",
                                        cert="/etc/site.crt", key="/etc/site.key"))
    lines = conf.splitlines()
    for want in ("bridge_protocol_version mqttv50", "cleansession false", "remote_clientid edgefleet-bridge-farm-3",
                 "address centre.example:8883", "bridge_cafile /etc/ca.pem", "bridge_certfile /etc/site.crt",
                 "bridge_keyfile /etc/site.key", "notification_topic edgefleet/v1/site/farm-3/bridge"):
        assert want in lines, want
    t = topic_lines(conf)
    assert t["edgefleet/v1/dev/+/state"] == ("out", 1)          # retained state and wills go up
    assert t["edgefleet/v1/dev/+/cmd"] == ("in", 1)
    assert t["edgefleet/v1/dev/+/reply/#"] == ("out", 1)
    assert all(q == 1 for _, q in t.values())
    # nothing of the relay's chunk traffic crosses; no rule names another site
    assert not [p for p in t if "/relay/want" in p or "/relay/chunk" in p or "/relay/state" in p]
    assert not [p for p in t if "/site/" in p and "farm-3" not in p]
    assert not [p for p in t if "#" == p or p.startswith("$")]


def test_bridge_config_per_board_downlink():
    t = topic_lines(bridge_config(BridgeSettings(site="s1", boards=("a1", "a2"))))
    assert "edgefleet/v1/dev/+/bin" not in t and t["edgefleet/v1/dev/a1/bin"] == ("in", 1)
    assert t["edgefleet/v1/dev/a2/cmd"] == ("in", 1)
    assert t["edgefleet/v1/dev/+/state"] == ("out", 1)   # up stays a wildcard: only the site's boards publish


@pytest.mark.parametrize("kw, needle", [
    ({"site": "a/b"}, "'/'"), ({"site": "s", "centre": "nohost"}, "HOST:PORT"),
    ({"site": "s", "centre": "h:99999"}, "HOST:PORT"), ({"site": "s", "cert": "c"}, "go together"),
    ({"site": "s", "cert": "c", "key": "k"}, "--tls-ca"), ({"site": "s", "boards": ("x+",)}, "board id"),
    ({"site": "s", "tls_ca": "a\nb"}, "one line"),
])
def test_bridge_settings_refuse_bad_values(kw, needle):
    with pytest.raises(ValueError, match=None) as exc:
        BridgeSettings(**kw)
    assert needle in str(exc.value)


def test_rules_table_is_plain_rows():
    assert all(isinstance(r, BridgeRule) and r.why for r in RULES)
    assert {r.direction for r in RULES} == {"in", "out", "local"}
    assert rules_for("local") and all(r.direction == "local" for r in rules_for("local"))
    with pytest.raises(ValueError):
        BridgeRule("x", "sideways", 1, "no")
    assert relay_want_topic("edgefleet", "s1", "b1") == "edgefleet/v1/site/s1/relay/want/b1"


def test_site_waves_canary_one_board_per_site_then_sites():
    devs = [("a1", "s1"), ("a2", "s1"), ("a3", "s1"), ("b1", "s2"), ("b2", "s2"), ("c1", None), ("c2", None)]
    assert plan_site_waves(devs) == [["a1", "b1", "c1"], ["a2", "a3"], ["b2"], ["c2"]]
    assert plan_site_waves(devs, sites_per_wave=2) == [["a1", "b1", "c1"], ["a2", "a3", "b2"], ["c2"]]
    assert plan_site_waves(devs, canary=False) == [["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2"]]
    assert plan_site_waves([("a1", "s1"), ("b1", "s2")]) == [["a1"], ["b1"]]
    assert plan_site_waves([("a1", "s1")]) == [["a1"]]
    assert plan_site_waves([]) == []
    p = RolloutPolicy(by_site=True, sites_per_wave=2)
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    with pytest.raises(RolloutConfigError):
        RolloutPolicy(sites_per_wave=0)


def _publish(topic: bytes, payload: bytes) -> bytes:
    body = len(topic).to_bytes(2, "big") + topic + payload
    n, rl = len(body), bytearray()
    while True:
        b, n = n % 128, n // 128
        rl.append(b | (0x80 if n else 0))
        if not n:
            break
    return bytes([0x30]) + bytes(rl) + body


def test_packet_counter_counts_whole_packets_fed_any_way():
    stream = _publish(b"a/b", b"x" * 300) + b"\xc0\x00" + _publish(b"c", b"y" * 20000)   # + PINGREQ
    for step in (len(stream), 1, 7):
        c = MqttPacketCounter()
        for i in range(0, len(stream), step):
            c.feed(stream[i:i + step])
        assert (c.packets, c.publishes) == (3, 2)
        assert c.publish_bytes == len(stream) - 2
    c = MqttPacketCounter()
    c.feed(stream[:-1])
    assert c.publishes == 1   # the last one is not whole yet


def test_bridge_config_cli_keeps_federated_updates_crossing_unless_the_relay_aggregates(tmp_path):
    """Without a relay fl component the boards' updates must cross the bridge: the default used to
    keep ``dev/+/data/fl`` on the site, so a site without a relay lost every federated update."""
    from click.testing import CliRunner

    from controller.cli.app import cli

    plain = CliRunner().invoke(cli, ["site", "bridge-config", "farm-1"])
    assert plain.exit_code == 0, plain.output
    assert "topic edgefleet/v1/dev/+/data/fl out 1" in plain.output.splitlines()
    relay = CliRunner().invoke(cli, ["site", "bridge-config", "farm-1", "--relay-fl"])
    assert relay.exit_code == 0, relay.output
    assert "topic edgefleet/v1/dev/+/data/fl out 1" not in relay.output.splitlines()
    assert "# stays on the site: edgefleet/v1/dev/+/data/fl" in relay.output
