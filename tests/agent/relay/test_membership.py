"""A board's site: config validation, its retained state and will; the [relay] section (no broker)."""
from __future__ import annotations

import pytest

from agent.app import Agent
from agent.core.config import ConfigError, parse_config


def test_site_is_in_the_state_and_the_will(tmp_path):
    cfg = parse_config({"device": {"id": "b1", "site": "farm-3"}, "state": {"dir": str(tmp_path)}})
    agent = Agent(cfg, features=lambda a: [])
    assert agent.state_body("online")["site"] == "farm-3"
    assert agent.state_body("offline")["site"] == "farm-3"   # the will names the site too
    plain = Agent(parse_config({"device": {"id": "b2"}, "state": {"dir": str(tmp_path / "b2")}}), features=lambda a: [])
    assert "site" not in plain.state_body("online")


@pytest.mark.parametrize("table, needle", [
    ({"device": {"id": "b", "site": "farm/3"}}, "device.site"),
    ({"device": {"id": "b", "site": "+"}}, "device.site"),
    ({"device": {"id": "r"}, "relay": {"enabled": True, "upstream": "mqtt://c:1883"}}, "device.site"),
    ({"device": {"id": "r", "site": "s"}, "relay": {"enabled": True}}, "relay.upstream"),
    ({"device": {"id": "r", "site": "s"}, "relay": {"enabled": True, "upstream": "http://x"}}, "relay.upstream"),
    ({"device": {"id": "r", "site": "s"}, "relay": {"cache_bytes": 5}}, "relay.cache_bytes"),
    ({"device": {"id": "r", "site": "s"}, "relay": {"components": ["chunks", "nope"]}}, "relay.components"),
    ({"device": {"id": "b"}, "model": {"relay_stall_s": 0}}, "model.relay_stall_s"),
])
def test_bad_site_and_relay_values_are_named(table, needle):
    with pytest.raises(ConfigError) as exc:
        parse_config(table)
    assert needle in str(exc.value)
