import subprocess
import sys

import pytest

from agent.core.config import ConfigError, load_config, parse_config


def test_minimal_config_gets_defaults():
    cfg = parse_config({"device": {"id": "pi-7"}})
    assert cfg.device.id == "pi-7"
    assert cfg.mqtt.broker == "mqtt://127.0.0.1:1883"
    assert cfg.telemetry.interval_s == 10.0
    assert cfg.homeassistant.prefix == "homeassistant"


@pytest.mark.parametrize("table,msg", [
    ({}, "[device]"),
    ({"device": {}}, "device.id is required"),
    ({"device": {"id": "a/b"}}, "device.id"),
    ({"device": {"id": "x"}, "mqtt": {"brokr": "mqtt://h"}}, "did you mean 'broker'"),
    ({"device": {"id": "x"}, "mqtt": {"broker": "http://h"}}, "mqtt.broker"),
    ({"device": {"id": "x"}, "mqtt": {"keepalive": "10"}}, "mqtt.keepalive must be an integer"),
    ({"device": {"id": "x"}, "mqtt": {"protocol": "4"}}, "mqtt.protocol must be one of"),
    ({"device": {"id": "x"}, "telemetry": {"interval_s": 0}}, "telemetry.interval_s"),
    ({"device": {"id": "x"}, "homeassistant": {"enabled": "yes"}}, "homeassistant.enabled must be true or false"),
    ({"device": {"id": "x"}, "nosuch": {}}, "unknown config key 'nosuch'"),
])
def test_bad_values_name_the_key(table, msg):
    with pytest.raises(ConfigError) as ei:
        parse_config(table)
    assert msg in str(ei.value)


def test_load_reports_bad_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    p = tmp_path / "bad.toml"
    p.write_text("[device\nid=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(p)


def test_check_command_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[device]\nid = "pi-1"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[device]\nid = "pi/1"\n')
    ok = subprocess.run([sys.executable, "-m", "agent.cli", "check", "--config", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "config OK" in ok.stdout
    ko = subprocess.run([sys.executable, "-m", "agent.cli", "check", "--config", str(bad)],
                        capture_output=True, text=True)
    assert ko.returncode == 2
    assert "device.id" in ko.stderr and "'/'" in ko.stderr
