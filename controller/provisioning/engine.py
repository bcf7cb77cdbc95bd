"""The controller's side of provisioning, run inside ``fleetctl serve``.

Claims arrive on ``{root}/v1/claim/req`` (sent with the fleet-wide claim credential); each is
verified (protocol/claims.py), stored ``pending`` and, when the auto-accept policy matches,
accepted at once. Operators decide the rest with ``fleetctl devices accept|reject|revoke``,
which only write the decision to the database; this engine carries decisions out, one
committed step at a time (issue the certificate → give it its broker identity → answer), so a
kill at any step is completed on restart. Renewals arrive on the device's own
``dev/{id}/data/cert`` (the broker vouches for the sender) and are answered with the signed
``cert.install`` command (or ``cert.refused`` with the reason).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from typing import Any, Callable

from protocol.claims import ClaimError, Request, answer, claim_answer_topic, claim_request_topic, parse_request
from protocol.mqttlink import Message
from protocol.topics import Topics

from ..audit import AuditLog
from .dynsec import RESPONSE, Dynsec, DynsecError
from .issuer import sign_request
from .policy import AutoAccept
from .store import ClaimStore

log = logging.getLogger("fleetctl.provisioning")

ENGINE = "controller"


def _peek_nonce(payload: bytes, max_bytes: int) -> str | None:
    """The nonce of a claim that may not verify (its refusal is answered there), if well formed."""
    try:
        nonce = json.loads(payload[:max_bytes]).get("nonce") if len(payload) <= max_bytes else None
    except (ValueError, AttributeError):
        return None
    return nonce if isinstance(nonce, str) and re.fullmatch(r"[0-9a-f]{32}", nonce) else None


class Provisioner:
    def __init__(self, store: ClaimStore, audit: AuditLog, topics: Topics, publish: Callable[..., bool],
                 command: Callable[[str, str, dict[str, Any]], bool], *, ca_dir: str, lifetime_s: float,
                 policy: AutoAccept = AutoAccept(), max_bytes: int = 16384, skew_s: float = 300.0,
                 reject: Callable[[str, str, str], None] | None = None, poll_s: float = 0.25) -> None:
        self.store, self.audit, self.topics = store, audit, topics
        self._publish, self._command = publish, command
        self.ca_dir, self.lifetime_s, self.policy = ca_dir, lifetime_s, policy
        self.max_bytes, self.skew_s, self.poll_s = max_bytes, skew_s, poll_s
        self.dynsec = Dynsec(publish)
        self._reject = reject or (lambda reason, topic, detail: None)
        self._wake = asyncio.Event()
        self.refused: dict[str, int] = {}

    def subscriptions(self) -> list[tuple[str, int]]:
        return [(claim_request_topic(self.topics), 1), (RESPONSE, 1)]

    def handles(self, msg: Message) -> bool:
        """Take the claim and dynamic-security topics (True when it did)."""
        if msg.topic == RESPONSE:
            self.dynsec.on_response(msg.payload)
            return True
        if msg.topic == claim_request_topic(self.topics):
            self.on_claim(msg.payload)
            return True
        return False

    # -- claims --------------------------------------------------------------
    def _refuse(self, topic: str, nonce: str | None, exc: ClaimError, stored: bool = False) -> None:
        self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
        self._reject("claim_" + exc.reason, topic, str(exc))
        if nonce and (stored or not self.store.has_nonce(nonce)):   # never overwrite a stored claim's answer
            try:
                self._publish(claim_answer_topic(self.topics, nonce),
                              answer(nonce, False, reason=exc.reason, error=str(exc)), 1, True)
            except ClaimError:
                pass

    def on_claim(self, payload: bytes, now: float | None = None) -> int | None:
        """Verify and store one claim; the claim id, or None when refused (answered with the reason)."""
        topic = claim_request_topic(self.topics)
        now = time.time() if now is None else now
        nonce = _peek_nonce(payload, self.max_bytes)   # where a refusal is answered
        try:
            req = parse_request(payload, now, purpose="claim", max_bytes=self.max_bytes, skew_s=self.skew_s)
            nonce = req.nonce
            if self.store.has_nonce(req.nonce):
                raise ClaimError("replayed", f"nonce {req.nonce} was used before")
            ident = self.store.identity(req.device_id)
            if ident is not None:
                raise ClaimError("exists" if ident[0] != "revoked" else "revoked",
                                 f"device {req.device_id!r} already has an identity ({ident[0]}): "
                                 "revoke it first (fleetctl devices revoke) to claim the id again"
                                 if ident[0] != "revoked" else f"device {req.device_id!r} is revoked")
            if self.store.open_claim_for(req.device_id) is not None:
                raise ClaimError("duplicate", f"device {req.device_id!r} already has an open claim")
            claim_id = self.store.add(req.device_id, req.nonce, req.hardware, req.tags, req.csr_pem, now)
            if claim_id is None:
                nonce = None   # never overwrite the answer of the original claim
                raise ClaimError("replayed", f"nonce {req.nonce} was used before")
        except ClaimError as exc:
            log.warning("refused claim: %s", exc)
            self._refuse(topic, nonce, exc)
            return None
        log.info("claim %d from %s pending", claim_id, req.device_id)
        rule = self.policy.matches(req.device_id, req.tags)
        if rule and self.store.decide(claim_id, "accepted", ENGINE, rule):
            self.audit.append(f"{ENGINE} ({rule})", "device.accept", req.device_id, {"claim": claim_id})
        self._wake.set()
        return claim_id

    async def step(self) -> int:
        """Carry out every decided claim and revocation once; how many changed."""
        self.issue_accepted()
        return await self.complete()

    def issue_accepted(self) -> None:
        """Step 1 of an accepted claim: sign its certificate and commit it (``issued``)."""
        for c in self.store.list(("accepted",)):
            try:
                issued = sign_request(self.ca_dir, Request("claim", c.device_id, c.nonce, c.received_at, c.csr),
                                      self.lifetime_s)
            except ClaimError as exc:
                self.store.set_status(c.id, "failed", str(exc))
                self._refuse(claim_request_topic(self.topics), c.nonce, exc, stored=True)
                continue
            self.store.set_issued(c.id, issued.cert_pem, issued.serial, issued.not_after)

    async def complete(self) -> int:
        """Step 2 (after a restart too): broker identities for ``issued`` claims, then the answers;
        rejections answered; revocations carried out."""
        done = 0
        issued_claims = self.store.list(("issued",))
        if issued_claims:   # the broker identities in one batch, then the answers
            await self.dynsec.add_devices(self.topics, [c.device_id for c in issued_claims])
            for c in issued_claims:
                self.store.set_identity(c.device_id, "active", None, c.not_after)
                self._publish(claim_answer_topic(self.topics, c.nonce), answer(c.nonce, True, cert_pem=c.cert or ""),
                              1, True)
                self.store.set_status(c.id, "done")
                done += 1
        for c in self.store.list(("rejecting",)):
            self._publish(claim_answer_topic(self.topics, c.nonce),
                          answer(c.nonce, False, reason="rejected", error=c.reason or "rejected by an operator"), 1,
                          True)
            self.store.set_status(c.id, "rejected")
            done += 1
        for device_id, (status, _) in self.store.identities().items():
            if status == "revoking":
                await self.dynsec.remove_device(device_id)
                self.store.set_identity(device_id, "revoked", None, None, "revoked by an operator")
                done += 1
        return done

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except DynsecError as exc:
                log.error("provisioning: %s (will retry)", exc)
                await asyncio.sleep(2.0)
            except Exception:  # noqa: BLE001 - our bug: log, keep serving the rest
                log.exception("provisioning step failed")
                await asyncio.sleep(2.0)
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            self.store.db.rollback()  # end the read so the CLI's decisions are seen

    # -- renewals --------------------------------------------------------------
    def on_renew(self, device_id: str, payload: bytes, now: float | None = None) -> bool:
        """Sign a renewal from ``device_id`` (the broker vouched for the topic); answer either way."""
        now = time.time() if now is None else now
        nonce = ""
        try:
            req = parse_request(payload, now, purpose="renew", max_bytes=self.max_bytes, skew_s=self.skew_s,
                                expect_device=device_id)
            nonce = req.nonce
            ident = self.store.identity(device_id)
            if ident is None:
                raise ClaimError("unknown_device", f"{device_id!r} was never provisioned")
            if ident[0] != "active":
                raise ClaimError("revoked", f"{device_id!r} is {ident[0]}: no new certificate")
            if not self.store.use_renew_nonce(device_id, req.nonce):
                raise ClaimError("replayed", f"renewal nonce {req.nonce} was used before")
            issued = sign_request(self.ca_dir, req, self.lifetime_s, now)
        except ClaimError as exc:
            log.warning("refused renewal from %s: %s", device_id, exc)
            self.refused[exc.reason] = self.refused.get(exc.reason, 0) + 1
            self._reject("renew_" + exc.reason, self.topics.data(device_id, "cert"), str(exc))
            self._command(device_id, "cert.refused", {"nonce": nonce, "reason": exc.reason, "error": str(exc)})
            return False
        self.store.set_identity(device_id, "active", issued.serial, issued.not_after)
        self.audit.append(f"device:{device_id}", "cert.renew", device_id,
                          {"serial": issued.serial, "not_after": issued.not_after})
        self._command(device_id, "cert.install", {"nonce": req.nonce, "cert": issued.cert_pem})
        log.info("renewed %s's certificate until %s", device_id, time.strftime("%H:%M:%S", time.gmtime(issued.not_after)))
        return True
