"""Why a broker connection failed, and when to say so (protocol/linkreport.py): pure, no I/O.

On the old code a dead broker logged nothing, every lost session said "Unspecified error", and two
processes with one id pushed each other off every half second without a word."""
from __future__ import annotations

import socket
import ssl

import pytest

from protocol.linkreport import (FailureLog, TakeoverDetector, describe_exception, describe_loss,
                                 describe_refusal, describe_socket_error, not_authorized_text)


@pytest.mark.parametrize("exc,words", [
    (ConnectionRefusedError(111, "Connection refused"), ("refused", "broker.lan:8883")),
    (socket.gaierror(-2, "Name or service not known"), ("DNS", "'broker.lan'")),
    (TimeoutError("timed out"), ("timeout", "broker.lan:8883")),
    (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"), ("TLS", "not trusted")),
    (ConnectionResetError(104, "Connection reset by peer"), ("reset", "broker.lan:8883")),
    (OSError(113, "No route to host"), ("No route to host", "broker.lan:8883")),
])
def test_each_connect_failure_is_named_with_the_address(exc, words):
    text = describe_exception(exc, "broker.lan", 8883)
    assert all(w in text for w in words), text


def test_refusals_and_losses_say_what_happened():
    assert describe_refusal("Not authorized").startswith("authentication")
    assert describe_refusal("Bad user name or password").startswith("authentication")
    assert "Server unavailable" in describe_refusal("Server unavailable")
    assert describe_loss("Session taken over", True) == "session taken over by another client with our id"
    assert describe_loss("Unspecified error", False).startswith("the broker closed the connection")
    assert describe_loss("Unspecified error", False, "failed to receive on socket: [Errno 104] Connection reset "
                         "by peer") == "connection lost: [Errno 104] Connection reset by peer"
    assert "keepalive" in describe_loss("Keep alive timeout", False)


def test_a_tls_alert_about_our_certificate_says_so():
    line = "failed to receive on socket: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca (_ssl.c:2580)"
    assert describe_socket_error(line, True) == "TLS: the broker refused our client certificate (tlsv1 alert unknown ca)"
    assert describe_socket_error("failed to receive on socket: [Errno 32] Broken pipe", True) == \
        "connection lost during connect: [Errno 32] Broken pipe"
    # TLS 1.3: the close can beat the alert (a race seen under load): the same refusal
    eof = "failed to receive on socket: EOF occurred in violation of protocol (_ssl.c:2427)"
    assert describe_socket_error(eof, True).startswith("TLS: the broker refused our client certificate")
    assert describe_socket_error(eof, False) == "connection lost: EOF occurred in violation of protocol (_ssl.c:2427)"


def test_failures_are_logged_first_on_change_and_then_at_a_bounded_rate():
    f = FailureLog(interval_s=60)
    said = [f.failed("refused", t) for t in (0, 0.5, 1, 30, 59.9)]
    assert said == [True, False, False, False, False]
    assert f.failed("TLS: x", 61) is True          # a new reason is said at once
    assert f.failed("TLS: x", 62) is False
    assert f.failed("TLS: x", 121.5) is True       # then once a minute
    assert f.connected() == 8 and f.failures == 0
    assert f.failed("refused", 200) is True        # a new outage starts over


def test_a_takeover_is_recognised_and_backs_off_doubling():
    d = TakeoverDetector(limit=3, window_s=60, backoff_s=30, max_backoff_s=100)
    assert d.lost(1.0, session_s=0.6) is None
    assert d.lost(2.0, session_s=0.6) is None
    assert d.lost(3.0, session_s=0.6) == 30          # three bounces in a row: someone else has our id
    assert [d.lost(t, session_s=0.5) for t in (40, 41, 42)] == [None, None, 60]
    assert [d.lost(t, session_s=0.5) for t in (80, 81, 82)] == [None, None, 100]   # capped
    assert d.lost(500, session_s=400) is None         # a long session resets the episode count
    assert [d.lost(t, session_s=0.5) for t in (501, 502, 503)] == [None, None, 30]


def test_an_outage_is_not_a_takeover():
    d = TakeoverDetector(limit=3, window_s=60)
    for t in range(10):       # the broker restarts: the session ends and the next attempt fails
        assert d.lost(float(t), session_s=5) is None
        d.connect_failed()
    assert d.lost(20.0, "Session taken over") == 30   # a broker that says so is believed at once


def test_not_authorized_names_the_id_and_the_cn():
    text = not_authorized_text("edgefleet/v1/dev/pi-10/state", "pi-10", "pi-09", None)
    assert "'pi-10'" in text and "certificate CN is 'pi-09'" in text and "edgefleet/v1/dev/pi-10/state" in text
    assert "pi-07" in not_authorized_text("x/y", "pi-07", "pi-07", None)
