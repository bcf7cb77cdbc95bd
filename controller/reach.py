"""Why the CLI cannot reach the broker, in words an operator can act on (refused, DNS, TLS, timeout).

``fleetctl`` commands that need the broker give its MQTT link a short head start; when it is not
connected by then, ``diagnose`` opens one plain TCP (and TLS, for mqtts) connection the way the
link would and names what failed. The connection's own CONNACK refusal (bad credentials, an ACL,
a certificate the broker rejects) comes from the link (``MqttLink.last_error``). Nothing here
speaks MQTT: paho stays in protocol/mqttlink.py.
"""
from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from protocol.mqttconf import BrokerAddress, TlsFiles


@dataclass(frozen=True)
class Unreachable:
    kind: str      # dns | refused | timeout | tls | network
    detail: str

    def message(self, url: str) -> str:
        what = {"dns": "the host name does not resolve", "refused": "connection refused (is the broker running, "
                "on this port?)", "timeout": "no answer (a firewall, or the wrong host?)",
                "tls": "TLS handshake failed", "network": "network error"}[self.kind]
        return f"cannot reach the broker at {url}: {what}: {self.detail}"


def classify(exc: BaseException) -> Unreachable:
    """The kind of a connection failure (pure: tests feed it exceptions)."""
    if isinstance(exc, socket.gaierror):
        return Unreachable("dns", exc.strerror or str(exc))
    if isinstance(exc, ConnectionRefusedError):
        return Unreachable("refused", exc.strerror or str(exc))
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return Unreachable("timeout", str(exc) or "timed out")
    if isinstance(exc, ssl.SSLError):
        return Unreachable("tls", getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or str(exc))
    if isinstance(exc, FileNotFoundError):
        return Unreachable("tls", f"{exc.filename}: no such file")
    if isinstance(exc, OSError):
        return Unreachable("network", exc.strerror or str(exc))
    return Unreachable("network", str(exc))


def diagnose(addr: BrokerAddress, tls: TlsFiles | None, timeout: float = 3.0) -> Unreachable | None:
    """Connect once as the MQTT link would; None when TCP (and TLS) succeed."""
    try:
        sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        return classify(exc)
    try:
        if addr.tls or (tls and tls.ca_file):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            if tls and tls.ca_file:
                ctx.load_verify_locations(tls.ca_file)
            else:
                ctx.load_default_certs()
            if tls and tls.cert_file:
                ctx.load_cert_chain(tls.cert_file, tls.key_file)
            with ctx.wrap_socket(sock, server_hostname=addr.host) as s:
                s.settimeout(timeout)
        return None
    except (OSError, ssl.SSLError) as exc:
        return classify(exc)
    finally:
        sock.close()
