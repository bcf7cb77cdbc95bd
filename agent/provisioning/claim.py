"""First start of a new board: claim an identity, then never use the claim credential again.

The claim credential (a fleet-wide certificate whose broker rights are "send a claim, read
answers") buys one signed request. The fresh key is written (0600) and the claim saved in the
state dir *before* it is sent, so a board restarted while waiting for an operator waits for
the same answer instead of claiming again. On acceptance the key and certificate go to
``mqtt.key_file``/``mqtt.cert_file`` by atomic rename (key first: a certificate on disk always
has its key) and the daemon starts with them.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
from pathlib import Path

from protocol.claims import ClaimError, check_issued, claim_answer_topic, claim_request_topic, key_pem, make_request
from protocol.mqttlink import MqttLink, TlsFiles
from protocol.topics import Topics

from .files import load_key, write_atomic

log = logging.getLogger("edge_agent.claim")


class ClaimRefused(RuntimeError):
    def __init__(self, reason: str, error: str) -> None:
        super().__init__(f"claim refused ({reason}): {error}")
        self.reason = reason


def needs_claim(cfg) -> bool:
    return bool(cfg.provisioning.claim_cert and cfg.mqtt.cert_file and not Path(cfg.mqtt.cert_file).exists())


def hardware() -> dict:
    return {"machine": platform.machine(), "system": platform.system(), "cpus": os.cpu_count()}


async def claim_identity(cfg, timeout: float | None = None) -> Path:
    """Claim, wait for the answer (forever by default: an operator may accept later), install it."""
    p, m = cfg.provisioning, cfg.mqtt
    topics = Topics(m.topic_root)
    state = Path(cfg.state.dir) / "claim.json"
    pending_key = Path(m.key_file + ".claim")
    saved = json.loads(state.read_text()) if state.exists() else None
    key = load_key(pending_key) if saved else None
    if saved is None or key is None:
        from protocol.claims import new_key

        key = new_key()
        write_atomic(pending_key, key_pem(key), 0o600)
        saved = {"body": make_request(key, cfg.device.id, "claim", hardware=hardware(), tags=p.tags), "sent": False}
        write_atomic(state, json.dumps(saved).encode())
    body = saved["body"]
    nonce = body["nonce"]
    answer_topic = claim_answer_topic(topics, nonce)
    link = MqttLink.from_settings(m, f"claim-{cfg.device.id}-{nonce[:6]}", subscriptions=[(answer_topic, 1)])
    link.tls = TlsFiles(m.ca_file, p.claim_cert, p.claim_key)

    async def send() -> None:
        if saved.get("sent"):
            return   # the answer is retained: a resend would only be a replay
        if await link.publish_and_wait(claim_request_topic(topics), json.dumps(body).encode(), 1, timeout=10):
            saved["sent"] = True
            write_atomic(state, json.dumps(saved).encode())
            log.info("claim %s sent for %s; waiting for the answer", nonce, cfg.device.id)

    link.on_connect = send
    await link.start()
    try:
        ans = await asyncio.wait_for(_answer(link, answer_topic, nonce), timeout)
    finally:
        await link.stop()
    if not ans.get("ok"):
        state.unlink(missing_ok=True)
        pending_key.unlink(missing_ok=True)
        raise ClaimRefused(str(ans.get("reason")), str(ans.get("error")))
    try:
        check_issued(str(ans.get("cert", "")), key, Path(m.ca_file).read_bytes(), cfg.device.id)
    except ClaimError as exc:
        raise ClaimRefused(exc.reason, str(exc)) from None
    write_atomic(m.key_file, key_pem(key), 0o600)
    write_atomic(m.cert_file, str(ans["cert"]).encode())
    pending_key.unlink(missing_ok=True)
    state.unlink(missing_ok=True)
    log.info("claimed: %s now has its own certificate %s", cfg.device.id, m.cert_file)
    return Path(m.cert_file)


async def _answer(link: MqttLink, topic: str, nonce: str) -> dict:
    while True:
        msg = await link.messages.get()
        if msg.topic != topic or not msg.payload:
            continue
        try:
            ans = json.loads(msg.payload)
        except ValueError:
            continue
        if isinstance(ans, dict) and ans.get("nonce") == nonce:
            return ans
