"""Claims store, auto-accept policy, the audit log (append-only), expiry notes: pure or SQLite only."""
from __future__ import annotations

import inspect
import time

from controller import audit
from controller.audit import AuditLog
from controller.cli.provision import expiry_note
from controller.db import connect
from controller.provisioning.policy import AutoAccept
from controller.provisioning.store import ClaimStore


def test_claim_lifecycle_and_replay(tmp_path):
    s = ClaimStore(connect(tmp_path / "c.db"))
    cid = s.add("pi-1", "ab" * 16, {"cpus": 4}, ["lab"], "CSR")
    assert cid and s.add("pi-1", "ab" * 16, {}, [], "CSR") is None         # same nonce: a replay
    assert s.open_claim_for("pi-1").id == cid and s.find("pi-1").id == cid and s.find(str(cid)).id == cid
    assert s.decide(cid, "accepted", "op") and not s.decide(cid, "rejected", "op")   # decided once
    s.set_issued(cid, "PEM", "abc", time.time() + 60)
    assert s.get(cid).status == "issued"
    s.set_identity("pi-1", "active", "abc", 1.0)
    s.set_identity("pi-1", "revoked", None, None, "why")
    assert s.identity("pi-1") == ("revoked", "abc", 1.0)
    assert s.use_renew_nonce("pi-1", "cd" * 16) and not s.use_renew_nonce("pi-1", "cd" * 16)


def test_auto_accept_policy():
    p = AutoAccept(("line-*",), ("factory",))
    assert p.matches("line-7", ()) == "auto-accept pattern line-*"
    assert p.matches("pi-1", ("factory",)) == "auto-accept tag factory"
    assert p.matches("pi-1", ("lab",)) is None and AutoAccept().matches("x", ("y",)) is None


def test_audit_is_append_only(tmp_path):
    log = AuditLog(connect(tmp_path / "a.db"))
    log.append("key:ab os:me", "deploy", "m@2", {"devices": ["pi-1"]})
    log.append("key:ab os:me", "device.revoke", "pi-1")
    assert [(e.action, e.target) for e in log.entries()] == [("deploy", "m@2"), ("device.revoke", "pi-1")]
    assert [e.action for e in log.entries(action="deploy")] == ["deploy"]
    src = inspect.getsource(audit)
    assert "UPDATE audit" not in src and "DELETE FROM audit" not in src


def test_expiry_note():
    now = 1000.0
    assert expiry_note(None) == "-" and expiry_note(900, now) == "EXPIRED!"
    assert expiry_note(now + 30, now) == "30s!" and expiry_note(now + 30 * 86400, now) == "30d"
