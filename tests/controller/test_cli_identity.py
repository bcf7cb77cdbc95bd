"""Which broker identity the CLI connects under (controller/link.py: cli_settings)."""
from __future__ import annotations

import pytest

from controller.config import ConfigError, parse_config
from controller.link import CliIdentityError, cli_settings

TLS = {"broker": "mqtts://b:8883", "ca_file": "/pki/ca.pem"}


def test_an_anonymous_broker_needs_no_identity():
    cfg = parse_config({"mqtt": {"broker": "mqtt://127.0.0.1:1883"}})
    assert cli_settings(cfg) == cfg.mqtt


def test_the_cli_uses_its_own_certificate_and_keeps_the_rest_of_mqtt():
    cfg = parse_config({"mqtt": {**TLS, "cert_file": "/pki/controller.pem", "key_file": "/pki/controller.key",
                                 "topic_root": "site"},
                        "cli": {"cert_file": "/pki/alice.pem", "key_file": "/pki/alice.key"}})
    s = cli_settings(cfg)
    assert (s.cert_file, s.key_file) == ("/pki/alice.pem", "/pki/alice.key")
    assert (s.broker, s.ca_file, s.topic_root) == (TLS["broker"], TLS["ca_file"], "site")
    assert cfg.mqtt.cert_file == "/pki/controller.pem"      # serve keeps the controller's


@pytest.mark.parametrize("mqtt,cli,words", [
    ({**TLS, "cert_file": "/pki/controller.pem", "key_file": "/pki/controller.key"}, {}, ("[cli]", "certs issue")),
    ({"broker": "mqtt://controller:pw@b:1883"}, {}, ("[cli]", "controller")),
    ({"broker": "mqtt://b:1883", "username": "controller", "password_file": "/p"}, {}, ("[cli]",)),
    ({**TLS, "cert_file": "/pki/controller.pem", "key_file": "/pki/controller.key"},
     {"cert_file": "/pki/controller.pem", "key_file": "/pki/controller.key"}, ("controller's certificate",)),
    ({"broker": "mqtt://b:1883", "username": "controller", "password_file": "/p"},
     {"username": "controller", "password_file": "/p"}, ("controller's user",)),
    ({"broker": "mqtt://b:1883"}, {"cert_file": "/pki/alice.pem", "key_file": "/pki/alice.key"}, ("ca_file",)),
])
def test_the_cli_never_connects_as_the_controller(mqtt, cli, words):
    cfg = parse_config({"mqtt": mqtt, "cli": cli})
    with pytest.raises(CliIdentityError) as e:
        cli_settings(cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_cert_and_key_go_together():
    with pytest.raises(ConfigError, match="cli.cert_file"):
        parse_config({"cli": {"cert_file": "/pki/alice.pem"}})
