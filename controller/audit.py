"""The audit trail: who changed the fleet, when, and what. Append-only.

Every operator action that changes the fleet (deploy, rollback, pause/abort, round start/stop,
accept/reject/revoke a device, key and certificate operations) adds one row. There is no
UPDATE or DELETE path in this module; the table is read by ``fleetctl audit``.

*Who* is the credential that authorised the action: the Ed25519 command-signing key (its
fingerprint) when one is configured, and the broker identity (certificate CN or user) the CLI
connects with, plus the local OS user — so a row names the key that signed what it did.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from .db import Database, as_database, connect, has_table, migrate

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit(
    id AUTO_ID, ts REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, detail TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Entry:
    id: int
    ts: float
    actor: str
    action: str
    target: str
    detail: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "ts": self.ts, "actor": self.actor, "action": self.action, "target": self.target,
                "detail": self.detail}


def _fingerprint_of_public(pub: Any) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def _cert_cn(path: str) -> str | None:
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        cert = x509.load_pem_x509_certificate(open(path, "rb").read())
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(cns[0].value) if cns else None
    except (OSError, ValueError):
        return None


def actor_of(cfg: Any, role: str = "cli") -> str:
    """``key:<fp> cert:<CN> os:<user>`` for a controller config (the parts that are configured)."""
    parts = []
    sk = getattr(cfg.security, "signing_key", "")
    if sk:
        try:
            from protocol.signing import load_private

            parts.append(f"key:{_fingerprint_of_public(load_private(sk).public_key())}")
        except Exception:  # noqa: BLE001 - an unreadable key is reported by the command itself
            parts.append(f"key:{sk}")
    cert = (cfg.cli.cert_file if role == "cli" else "") or cfg.mqtt.cert_file
    cn = _cert_cn(cert) if cert else None
    if cn:
        parts.append(f"cert:{cn}")
    user = (cfg.cli.username if role == "cli" else "") or cfg.mqtt.username
    if user:
        parts.append(f"user:{user}")
    try:
        parts.append(f"os:{getpass.getuser()}")
    except (KeyError, OSError):
        pass
    return " ".join(parts) or "unknown"


class AuditLog:
    def __init__(self, db: Database, create: bool = True) -> None:
        self.db = as_database(db)
        if create:
            migrate(self.db, "audit", [SCHEMA])

    def append(self, actor: str, action: str, target: str = "", detail: dict[str, Any] | None = None,
               now: float | None = None) -> None:
        self.db.execute("INSERT INTO audit(ts, actor, action, target, detail) VALUES(?,?,?,?,?)",
                        (time.time() if now is None else now, actor, action, target,
                         json.dumps(detail or {}, sort_keys=True, default=str)))
        self.db.commit()

    def entries(self, limit: int = 1000, action: str | None = None) -> list[Entry]:
        q = "SELECT id, ts, actor, action, target, detail FROM audit"
        args: list[Any] = []
        if action:
            q += " WHERE action=?"
            args.append(action)
        rows = self.db.execute(q + " ORDER BY id DESC LIMIT ?", (*args, limit)).fetchall()
        return [Entry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5])) for r in reversed(rows)]


def record(cfg: Any, action: str, target: str = "", **detail: Any) -> None:
    """One line at each hook: append ``action`` on ``target`` by the CLI's credential to the
    controller database of ``cfg``."""
    db = connect(cfg.db_path)
    try:
        AuditLog(db).append(actor_of(cfg), action, str(target), detail)
    finally:
        db.close()


def reader(db: Database) -> AuditLog | None:
    return AuditLog(db, create=False) if has_table(db, "audit") else None


def cli_hook(action: str, target: str = "", **detail: Any) -> None:
    """The one-line hook in a CLI command: record into the controller database of the running
    ``fleetctl`` (its --config/--db). Commands that may run before a controller exists (``certs
    init``, ``keys init``) are recorded only when that database exists, and say so otherwise."""
    import os

    import click

    ctx = click.get_current_context(silent=True)
    obj = ctx.find_root().obj if ctx is not None else None
    if obj is None or not hasattr(obj, "cfg"):
        return
    cfg = obj.cfg()
    if cfg.db_is_sqlite and not os.path.exists(cfg.db_path):
        click.echo(f"note: {action} not audited: no controller database at {cfg.db_path} yet", err=True)
        return
    record(cfg, action, target, **detail)
