"""Signed claims and renewals: pure checks, no I/O."""
from __future__ import annotations

import json
import time

import pytest

from protocol.claims import (ClaimError, answer, check_issued, claim_answer_topic, make_request, new_key,
                             parse_request)
from protocol.topics import Topics


def enc(body) -> bytes:
    return json.dumps(body).encode()


def reason(payload: bytes, **kw) -> str:
    with pytest.raises(ClaimError) as e:
        parse_request(payload, kw.pop("now", time.time()), purpose=kw.pop("purpose", "claim"), **kw)
    return e.value.reason


def test_a_good_claim_verifies():
    body = make_request(new_key(), "pi-1", hardware={"cpus": 4}, tags=["lab"])
    req = parse_request(enc(body), time.time(), purpose="claim")
    assert (req.device_id, req.tags, req.hardware) == ("pi-1", ("lab",), {"cpus": 4})


def test_forged_altered_or_swapped_claims_are_refused():
    body = make_request(new_key(), "pi-1")
    assert reason(enc({**body, "hardware": {"cpus": 64}})) == "bad_signature"     # altered after signing
    assert reason(enc({**body, "device_id": "pi-2"})) == "id_mismatch"            # CSR names pi-1
    other = make_request(new_key(), "pi-1")
    assert reason(enc({**body, "csr": other["csr"]})) == "bad_signature"          # CSR of another key
    assert reason(enc({**body, "sig": "AAAA"})) == "bad_signature"
    assert reason(enc({**body, "csr": "-----BEGIN CERTIFICATE REQUEST-----\nxx\n"})) == "bad_csr"


def test_format_skew_size_purpose_and_sender():
    body = make_request(new_key(), "pi-1")
    assert reason(b"{not json") == "bad_json"
    assert reason(enc({**body, "schema": "x"})) == "bad_schema"
    assert reason(enc(body), now=time.time() + 3600) == "stale"
    assert reason(enc(body), purpose="renew") == "bad_purpose"
    assert reason(b" " * 20000 + enc(body)) == "oversize"
    assert reason(enc({**body, "nonce": "../#"})) == "bad_nonce"
    renew = make_request(new_key(), "pi-1", "renew")
    assert reason(enc(renew), purpose="renew", expect_device="pi-2") == "id_mismatch"
    assert reason(enc({**body, "device_id": "a/#"})) == "bad_device_id"


def test_answer_topic_needs_a_real_nonce():
    with pytest.raises(ClaimError):
        claim_answer_topic(Topics(), "+")
    assert claim_answer_topic(Topics(), "ab" * 16).endswith("/claim/answer/" + "ab" * 16)
    assert json.loads(answer("ab" * 16, False, reason="exists", error="x"))["reason"] == "exists"


def test_the_board_checks_what_comes_back(tmp_path):
    from controller.certs import init_ca
    from controller.provisioning.issuer import sign_request

    init_ca(tmp_path / "pki")
    other_ca = tmp_path / "other"
    init_ca(other_ca)
    key = new_key()
    req = parse_request(enc(make_request(key, "pi-1")), time.time(), purpose="claim")
    issued = sign_request(tmp_path / "pki", req, 60)
    ca = (tmp_path / "pki" / "ca.pem").read_bytes()
    assert check_issued(issued.cert_pem, key, ca, "pi-1")
    for bad, why in ((lambda: check_issued(issued.cert_pem, new_key(), ca, "pi-1"), "key_mismatch"),
                     (lambda: check_issued(issued.cert_pem, key, ca, "pi-2"), "id_mismatch"),
                     (lambda: check_issued(issued.cert_pem, key, (other_ca / "ca.pem").read_bytes(), "pi-1"),
                      "untrusted"),
                     (lambda: check_issued(issued.cert_pem, key, ca, "pi-1", now=time.time() + 120), "expired")):
        with pytest.raises(ClaimError) as e:
            bad()
        assert e.value.reason == why


def test_an_expired_signer_is_refused(tmp_path):
    from controller.certs import init_ca
    from controller.provisioning.issuer import sign_request

    init_ca(tmp_path, days=1)
    req = parse_request(enc(make_request(new_key(), "pi-1")), time.time(), purpose="claim")
    with pytest.raises(ClaimError) as e:
        sign_request(tmp_path, req, 2 * 86400)        # would outlive the CA
    assert e.value.reason == "signer_expired"
    with pytest.raises(ClaimError):
        sign_request(tmp_path, req, 60, now=time.time() + 3 * 86400)   # the CA itself has expired
