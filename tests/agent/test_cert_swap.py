"""The certificate swap survives a kill at every step: start() finishes or undoes it."""
from __future__ import annotations

import os
import shutil
import time
from types import SimpleNamespace

import pytest

from agent.core.config import ProvisioningSection
from agent.provisioning.files import pair_matches, write_atomic
from agent.provisioning.rotation import CertRotation, renew_time
from controller.certs import init_ca
from controller.provisioning.issuer import sign_request
from protocol.claims import key_pem, make_request, new_key, parse_request
import json


def _pair(pki, stem, base):
    key = new_key()
    req = parse_request(json.dumps(make_request(key, "pi-1")).encode(), time.time(), purpose="claim")
    write_atomic(f"{base}.key{stem}", key_pem(key), 0o600)
    write_atomic(f"{base}.pem{stem}", sign_request(pki, req, 60).cert_pem.encode())


def _rot(tmp_path):
    m = SimpleNamespace(ca_file=str(tmp_path / "pki" / "ca.pem"), cert_file=str(tmp_path / "own.pem"),
                        key_file=str(tmp_path / "own.key"))
    ctx = SimpleNamespace(cfg=SimpleNamespace(provisioning=ProvisioningSection(), mqtt=m))
    return CertRotation(ctx, reconnect=None), m


@pytest.mark.parametrize("kill_after", ["next_written", "key_promoted", "both_promoted"])
def test_swap_repairs_at_every_kill_point(tmp_path, kill_after):
    init_ca(tmp_path / "pki")
    base = str(tmp_path / "own")
    _pair(tmp_path / "pki", "", base)
    old_key = open(base + ".key", "rb").read()
    _pair(tmp_path / "pki", ".next", base)
    new_key_pem = open(base + ".key.next", "rb").read()
    for f in (base + ".key", base + ".pem"):
        shutil.copy2(f, f + ".prev")
    if kill_after in ("key_promoted", "both_promoted"):
        os.replace(base + ".key.next", base + ".key")
    if kill_after == "both_promoted":
        os.replace(base + ".pem.next", base + ".pem")
    rot, m = _rot(tmp_path)
    rot.start()
    assert pair_matches(m.cert_file, m.key_file)
    assert open(base + ".key", "rb").read() in (old_key, new_key_pem)
    assert rot.not_after > time.time()


def test_renew_time_is_two_thirds():
    assert renew_time(100.0, 130.0, 2 / 3) == pytest.approx(120.0)
