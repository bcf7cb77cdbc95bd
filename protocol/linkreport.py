"""Why a broker connection failed, said once and then at a bounded rate (pure: no sockets, no paho).

An unreachable broker must never be silent, and must not flood the log either. The MQTT edge
(protocol/mqttlink.py) feeds this module what happened — an exception from a connect attempt, a
CONNACK refusal, a lost session, a refused PUBACK — with the time, and gets back the text to log
and whether to log it now. Two patterns get names of their own:

* **takeover**: with ``use_username_as_clientid`` (configs/mosquitto) one identity has one
  connection; a second process under the same id pushes us off, we reconnect at once and push it
  off, forever. Mosquitto 2.0 closes the old connection without a DISCONNECT reason, so it is
  recognised by its shape: sessions that end although the next connect succeeds at once.
* **not authorized** on our own topics: the ACL confines a device to the subtree of its
  certificate's CN, so a device id that differs from the CN connects fine and then is refused.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import socket
import ssl

#: CONNACK / PUBACK / SUBACK reason texts (paho's) that mean "who you are is not accepted"
AUTH_REASONS = ("Not authorized", "Bad user name or password", "Bad username or password",
                "Client identifier not valid", "Banned", "Bad authentication method")


def describe_exception(exc: BaseException | None, host: str, port: int) -> str:
    """A connect attempt's exception as one line: refused, TLS, DNS, timeout or the OS error."""
    where = f"{host}:{port}"
    if exc is None:
        return f"cannot connect to {where}"
    if isinstance(exc, socket.gaierror):
        return f"DNS: cannot resolve {host!r} ({exc.strerror or exc})"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where} (no broker listening there?)"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc
        return f"TLS: the broker's certificate is not trusted ({why})"
    if isinstance(exc, ssl.SSLError):
        what = getattr(exc, "reason", None) or str(exc)
        if "CERTIFICATE_REQUIRED" in str(what).upper() or "UNKNOWN_CA" in str(what).upper() \
                or "BAD_CERTIFICATE" in str(what).upper():
            return f"TLS: the broker refused our client certificate ({what})"
        return f"TLS: {what}"
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"timeout connecting to {where}"
    if isinstance(exc, ConnectionResetError):
        return f"connection reset by {where} during connect (TLS expected? wrong port?)"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} ({where})"
    return f"{type(exc).__name__}: {exc}"


def describe_socket_error(line: str, during_connect: bool = False) -> str:
    """paho's socket error log line as a reason; a TLS alert about our certificate says so."""
    up = line.upper()
    if any(a in up for a in ("ALERT_UNKNOWN_CA", "CERTIFICATE_REQUIRED", "ALERT_BAD_CERTIFICATE",
                             "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED")):
        alert = line.rsplit("]", 1)[-1].split("(_ssl", 1)[0].strip() or line
        return f"TLS: the broker refused our client certificate ({alert})"
    if during_connect and "EOF OCCURRED IN VIOLATION OF PROTOCOL" in up:
        # TLS 1.3: the server checks our certificate after the client's side of the handshake is
        # done; whether its alert reaches us before the close is a race, so an EOF here means the same
        return ("TLS: the broker refused our client certificate (it closed the TLS session during "
                "connect without an alert)")
    what = "connection lost during connect" if during_connect else "connection lost"
    return line.replace("failed to receive on socket", what).replace("timeout on socket", "connection timed out")


def describe_refusal(reason: str) -> str:
    """A CONNACK refusal with its category (authentication or the broker's own reason)."""
    if any(r.lower() == reason.lower() for r in AUTH_REASONS):
        return f"authentication: the broker refused us ({reason})"
    return f"the broker refused the connection ({reason})"


def describe_loss(reason: str, from_server: bool, socket_error: str | None = None) -> str:
    """A lost session's reason: the broker's DISCONNECT reason if it sent one, else the socket's
    error (paho's log line), else — the connection simply closed — what that usually means."""
    if from_server:
        if reason.lower() == "session taken over":
            return "session taken over by another client with our id"
        return f"the broker disconnected us ({reason})"
    if "keep alive" in reason.lower() or "keepalive" in reason.lower():
        return "no answer from the broker within the keepalive (network or broker down)"
    if socket_error:
        return describe_socket_error(socket_error)
    if reason in ("Unspecified error", "Connection lost", "The connection was lost."):
        return ("the broker closed the connection (a broker restart or shutdown, or another client "
                "connecting with our id)")
    return reason


@dataclass
class FailureLog:
    """When to log a connect failure: the first one, a changed reason, then every ``interval_s``."""

    interval_s: float = 60.0
    failures: int = 0
    since: float | None = None
    _last_logged: float | None = None
    _last_reason: str | None = None

    def failed(self, reason: str, now: float) -> bool:
        """Count a failure; True if it should be logged now."""
        self.failures += 1
        if self.since is None:
            self.since = now
        due = (self._last_logged is None or reason != self._last_reason
               or now - self._last_logged >= self.interval_s)
        self._last_reason = reason
        if due:
            self._last_logged = now
        return due

    def connected(self) -> int:
        """Reset on success; returns how many attempts had failed before."""
        n, self.failures, self.since, self._last_logged, self._last_reason = self.failures, 0, None, None, None
        return n


class TakeoverDetector:
    """Recognises two processes under one id pushing each other off.

    A session shorter than ``short_s`` that is lost although the connect that made it succeeded at
    the first try (the broker is up and accepts us) is a "bounce"; a broker restart shows a failed
    attempt in between. ``limit`` bounces within ``window_s`` of each other:
    someone else uses our id. Then the link waits ``backoff_s`` (doubling, up to ``max_backoff_s``)
    before it reconnects, instead of pushing the other one off every half second."""

    def __init__(self, limit: int = 3, window_s: float = 60.0, backoff_s: float = 30.0,
                 max_backoff_s: float = 300.0, short_s: float = 10.0) -> None:
        self.limit, self.window_s, self.short_s = limit, window_s, short_s
        self.base_backoff, self.max_backoff = backoff_s, max_backoff_s
        self._bounces: deque[float] = deque()
        self._clean_connect = True      # the current session came without a failed attempt
        self.episodes = 0               # consecutive takeover verdicts (the backoff doubles)

    def connect_failed(self) -> None:
        self._clean_connect = False
        self._bounces.clear()

    def lost(self, now: float, from_server_reason: str | None = None, session_s: float = 0.0) -> float | None:
        """A session ended after ``session_s``; returns the back-off (s) when it looks like a
        takeover, else None. A session that lasted ``window_s`` starts a new count."""
        taken = bool(from_server_reason and from_server_reason.lower() == "session taken over")
        if session_s >= self.window_s:
            self.stable()
        if taken or (self._clean_connect and session_s < self.short_s):
            self._bounces.append(now)
        while self._bounces and now - self._bounces[0] > self.window_s:
            self._bounces.popleft()
        self._clean_connect = True
        if taken or len(self._bounces) >= self.limit:
            self._bounces.clear()
            self.episodes += 1
            return min(self.max_backoff, self.base_backoff * 2 ** (self.episodes - 1))
        return None

    def stable(self) -> None:
        """The session lasted (``window_s``): forget earlier episodes."""
        self.episodes = 0
        self._bounces.clear()


def certificate_cn(cert_file: str | None) -> str | None:
    """The subject CN of a PEM certificate (the broker's username with use_identity_as_username)."""
    if not cert_file:
        return None
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        with open(cert_file, "rb") as fh:
            cert = x509.load_pem_x509_certificate(fh.read())
        attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else None
    except (OSError, ValueError):
        return None


def not_authorized_text(topic: str, client_id: str, cn: str | None, username: str | None) -> str:
    """The ERROR for a refused publish/subscribe on ``topic``, naming the id and the identity."""
    who = cn or username
    if who and who != client_id:
        kind = "certificate CN" if cn else "username"
        return (f"the broker refused {topic}: not authorized — this client's id is {client_id!r} but its "
                f"{kind} is {who!r}, and the ACL confines a client to its {kind}'s topics; make [device] id "
                f"and the {kind} the same")
    return f"the broker refused {topic}: not authorized (the ACL does not grant it to {who or client_id!r})"
