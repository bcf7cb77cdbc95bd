"""Build the Provisioner from the controller config (None when provisioning is off)."""
from __future__ import annotations

from typing import Any, Callable

from protocol.topics import Topics

from ..audit import AuditLog
from .engine import Provisioner
from .policy import AutoAccept
from .store import ClaimStore


def make_provisioner(cfg: Any, db: Any, topics: Topics, publish: Callable[..., bool],
                     command: Callable[[str, str, dict[str, Any]], bool],
                     reject: Callable[[str, str, str], None]) -> Provisioner | None:
    p = cfg.provisioning
    if not p.enabled:
        return None
    return Provisioner(ClaimStore(db), AuditLog(db), topics, publish, command, ca_dir=p.ca_dir,
                       lifetime_s=p.cert_lifetime_s, policy=AutoAccept(tuple(p.auto_accept), tuple(p.auto_accept_tags)),
                       max_bytes=p.max_claim_bytes, skew_s=p.max_skew_s, reject=reject)
