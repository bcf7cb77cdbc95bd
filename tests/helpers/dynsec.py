"""A real Mosquitto with the dynamic-security plugin, mTLS from a fresh fleet CA, and
``use_identity_as_username`` (a device's certificate CN is its broker client), for the
provisioning tests. A separate module, so tests/helpers/broker.py (shared by every helper)
only gained nothing: this is ``Mosquitto(extra_conf=...)``."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from controller.certs import init_ca, issue_client, issue_server

from .broker import Mosquitto

PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"
ROOT = "edgefleet/v1"


def _role(name: str, acls: list[tuple[str, str]]) -> dict:
    return {"rolename": name, "acls": [{"acltype": t, "topic": topic, "allow": True, "priority": 0}
                                        for t, topic in acls]}


def dynsec_json(admins: tuple[str, ...] = ("controller", "operator"), claim: str = "claim") -> dict:
    """The plugin's initial state: the controller (and operators) may use the fleet tree and
    ``$CONTROL``; the claim identity may only send claims and read answers; the rest is denied."""
    everything = [("publishClientSend", "#"), ("publishClientReceive", "#"), ("subscribePattern", "#"),
                  ("unsubscribePattern", "#"), ("publishClientSend", "$CONTROL/dynamic-security/#"),
                  ("publishClientReceive", "$CONTROL/dynamic-security/#"),
                  ("subscribePattern", "$CONTROL/dynamic-security/#")]
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True, "subscribe": False,
                             "unsubscribe": True},
        "clients": [{"username": a, "roles": [{"rolename": "fleet-admin"}]} for a in admins]
        + [{"username": claim, "roles": [{"rolename": "claimer"}]}],
        "groups": [],
        "roles": [_role("fleet-admin", everything),
                  _role("claimer", [("publishClientSend", f"{ROOT}/claim/req"),
                                    ("subscribePattern", f"{ROOT}/claim/answer/+")])],
    }


@dataclass
class DynsecBroker:
    broker: Mosquitto
    pki: Path

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def url(self) -> str:
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def identity(self, name: str) -> tuple[Path, Path]:
        """(cert, key) for ``name`` signed by the fleet CA (issued on first use)."""
        if not (self.pki / f"{name}.pem").exists():
            issue_client(self.pki, name)
        return self.pki / f"{name}.pem", self.pki / f"{name}.key"

    def mqtt_toml(self, name: str) -> str:
        cert, key = self.identity(name)
        return (f'[mqtt]\nbroker = "{self.url}"\nca_file = "{self.pki / "ca.pem"}"\ncert_file = "{cert}"\n'
                f'key_file = "{key}"\n')

    def stop(self) -> None:
        self.broker.stop()


def start_dynsec_broker(workdir: Path) -> DynsecBroker:
    if not os.path.exists(PLUGIN):
        pytest.fail(f"{PLUGIN} is missing (apt-get install -y mosquitto): the provisioning tests need it")
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    init_ca(pki)
    issue_server(pki, ["127.0.0.1", "localhost"])
    for name in ("controller", "operator", "claim"):
        issue_client(pki, name)
    state = workdir / "dynamic-security.json"
    state.write_text(json.dumps(dynsec_json(), indent=1))
    extra = (f"plugin {PLUGIN}\nplugin_opt_config_file {state}\n"
             f"cafile {pki / 'ca.pem'}\ncertfile {pki / 'server.pem'}\nkeyfile {pki / 'server.key'}\n"
             "require_certificate true\nuse_identity_as_username true\n")
    b = Mosquitto(workdir, extra_conf=extra).start()
    return DynsecBroker(b, pki)
