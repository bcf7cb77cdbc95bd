"""Unattended certificate renewal: a new key and CSR at 2/3 of the lifetime, signed by the
controller, swapped in by atomic rename, kept only once it has connected.

Swap (every step survives a kill; ``start()`` repairs a half-done one):
1. new key → ``key_file.next`` (0600); signed renewal on ``dev/{id}/data/cert``;
2. the controller answers with the signed ``cert.install`` command (or ``cert.refused``);
   the certificate is checked (our key, our id, our CA, valid now) → ``cert_file.next``;
3. the current pair is copied to ``.prev``; ``.next`` renamed over the current files (key first);
4. reconnect with them; connected within ``connect_timeout_s`` → drop ``.prev``; else put
   ``.prev`` back, reconnect with the old pair and try again later.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

from protocol.claims import ClaimError, check_issued, key_pem, make_request, new_key, renew_topic
from protocol.mqttlink import TlsFiles

from ..core.context import CommandError, Feature
from .files import load_cert, pair_matches, sync_dir, write_atomic

log = logging.getLogger("edge_agent.cert")


def renew_time(not_before: float, not_after: float, at: float) -> float:
    return not_before + at * (not_after - not_before)


class CertRotation(Feature):
    name = "cert"

    def __init__(self, ctx: Any, reconnect: Callable[[TlsFiles], Awaitable[None]]) -> None:
        self.ctx = ctx
        self.p = ctx.cfg.provisioning
        m = ctx.cfg.mqtt
        self.ca, self.cert, self.key = m.ca_file, m.cert_file, m.key_file
        self._reconnect = reconnect
        self._waiting: tuple[str, asyncio.Future] | None = None
        self.renewals = 0
        self.failures = 0
        self.last_error = ""
        self.not_before = self.not_after = 0.0

    # -- files -------------------------------------------------------------
    def start(self) -> None:
        self.repair()
        self._load()

    def repair(self) -> None:
        """Finish or undo a swap a kill interrupted, so the current pair always matches."""
        if pair_matches(self.cert, self.key):
            for suffix in (".prev",):
                for f in (self.cert, self.key):
                    Path(f + suffix).unlink(missing_ok=True)
            return
        if pair_matches(self.cert + ".next", self.key + ".next") or pair_matches(self.cert + ".next", self.key):
            self._promote()
        elif pair_matches(self.cert + ".prev", self.key + ".prev"):
            self._restore_prev()
        if not pair_matches(self.cert, self.key):
            log.error("%s and %s do not match and no earlier pair is left", self.cert, self.key)

    def _load(self) -> None:
        c = load_cert(self.cert)
        if c is not None:
            self.not_before = c.not_valid_before_utc.timestamp()
            self.not_after = c.not_valid_after_utc.timestamp()

    def _promote(self) -> None:
        for f in (self.key, self.cert):   # key first: a certificate on disk always has its key
            if os.path.exists(f + ".next"):
                os.replace(f + ".next", f)
        sync_dir(Path(self.cert).parent)

    def _restore_prev(self) -> None:
        for f in (self.key, self.cert):
            if os.path.exists(f + ".prev"):
                os.replace(f + ".prev", f)
        sync_dir(Path(self.cert).parent)

    def _tls(self) -> TlsFiles:
        return TlsFiles(self.ca, self.cert, self.key)

    # -- feature -----------------------------------------------------------
    def commands(self) -> dict[str, Any]:
        return {"cert.install": self._cmd_install, "cert.refused": self._cmd_refused}

    def telemetry(self) -> dict[str, Any]:
        return {"not_after": round(self.not_after, 3), "expires_in_s": round(self.not_after - time.time(), 1),
                "renewals": self.renewals, "failures": self.failures, "last_error": self.last_error}

    def state_fields(self) -> dict[str, Any]:
        return {"cert_not_after": round(self.not_after, 3)}

    def tasks(self) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
        return [("cert-rotation", self._loop)] if self.p.rotate and self.not_after else []

    def _cmd_install(self, args: dict[str, Any], env: Any) -> dict[str, Any]:
        w = self._waiting
        if w is None or args.get("nonce") != w[0]:
            raise CommandError("no renewal with this nonce is waiting")
        if not w[1].done():
            w[1].set_result(str(args.get("cert", "")))
        return {"accepted": True}

    def _cmd_refused(self, args: dict[str, Any], env: Any) -> dict[str, Any]:
        w = self._waiting
        if w is not None and args.get("nonce") in (w[0], "") and not w[1].done():
            w[1].set_exception(ClaimError(str(args.get("reason")), str(args.get("error"))))
        return {"noted": True}

    # -- the loop ------------------------------------------------------------
    async def _loop(self) -> None:
        backoff = min(self.p.answer_timeout_s, 5.0)
        while True:
            due = renew_time(self.not_before, self.not_after, self.p.renew_at)
            await asyncio.sleep(max(0.0, due - time.time()))
            while not self.ctx.connected:
                await asyncio.sleep(0.2)
            try:
                await self.renew_once()
                backoff = min(self.p.answer_timeout_s, 5.0)
            except (ClaimError, asyncio.TimeoutError, OSError) as exc:
                self.failures += 1
                self.last_error = getattr(exc, "reason", None) or type(exc).__name__
                log.error("certificate renewal failed: %s (expires in %.0fs)", exc or self.last_error,
                          self.not_after - time.time())
                self.ctx.emit_event("cert.renew_failed", "error", reason=self.last_error, error=str(exc))
                self.ctx.counters.reject("cert_renew_failed")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 300.0)

    async def renew_once(self) -> None:
        dev = self.ctx.device_id
        key = new_key()
        write_atomic(self.key + ".next", key_pem(key), 0o600)
        body = make_request(key, dev, "renew")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiting = (body["nonce"], fut)
        try:
            if not self.ctx.publish(renew_topic(self.ctx.topics, dev), json.dumps(body).encode(), qos=1):
                raise ClaimError("unsent", "not connected")
            cert_pem = await asyncio.wait_for(fut, self.p.answer_timeout_s)
        finally:
            self._waiting = None
        check_issued(cert_pem, key, Path(self.ca).read_bytes(), dev)
        write_atomic(self.cert + ".next", cert_pem.encode())
        for f in (self.key, self.cert):   # the old pair stays until the new one has connected once
            shutil.copy2(f, f + ".prev")
        self._promote()
        await self._reconnect(self._tls())
        if await self._connected_within(self.p.connect_timeout_s):
            for f in (self.key, self.cert):
                Path(f + ".prev").unlink(missing_ok=True)
            self.renewals += 1
            self._load()
            log.info("certificate renewed: valid until %s", time.strftime("%H:%M:%S", time.gmtime(self.not_after)))
            self.ctx.emit_event("cert.renewed", not_after=self.not_after)
            return
        self._restore_prev()
        await self._reconnect(self._tls())
        raise ClaimError("new_cert_no_connect", "the renewed certificate did not connect: kept the old one")

    async def _connected_within(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ctx.connected:
                return True
            await asyncio.sleep(0.05)
        return False
