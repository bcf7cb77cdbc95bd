"""Secure aggregation's state machines, byte for byte, with no broker: the sum is exact with
dropouts, and every bad message is refused with a reason."""
import dataclasses

import numpy as np
import pytest

from protocol import secagg as sa
from protocol import secagg_crypto as sc
from protocol.secagg_wire import from_wire, run_local, size_of, to_wire

pytest.importorskip("Crypto.Protocol.SecretSharing")   # the secagg extra (in the test extra)


def vectors(n, length=7, seed=0):
    rng = np.random.default_rng(seed)
    return {f"d{i:02d}": rng.normal(0, 1, length) for i in range(n)}


def test_threshold_is_survivors_and_a_majority():
    assert sa.threshold_for(10, 0.3) == 7
    assert sa.threshold_for(10, 0.0) == 10
    assert sa.threshold_for(4, 0.4) == 3          # never below a majority
    with pytest.raises(ValueError):
        sa.threshold_for(10, 0.5)


def test_fixed_point_round_trip_and_overflow_guard():
    x = np.array([0.5, -1.25, 3e-9, 0.0])
    np.testing.assert_allclose(sc.decode(sc.encode(x, 28, 10), 28), x, atol=2 ** -28)
    with pytest.raises(ValueError, match="too large"):
        sc.encode(np.array([1e10]), 28, 10)
    with pytest.raises(ValueError, match="NaN"):
        sc.encode(np.array([np.nan]), 28, 10)


def test_shamir_32_byte_secret_any_k_of_n():
    secret = bytes(range(32))
    shares = sc.share(secret, 3, 5)
    assert sc.combine([shares[4], shares[0], shares[2]]) == secret
    assert sc.combine(shares[1:4]) == secret


def test_sum_is_exact_without_dropouts():
    v = vectors(5)
    total, srv, _ = run_local(v)
    np.testing.assert_allclose(total, sum(v.values()), atol=1e-7)
    assert srv.state == "done" and srv.refused == []


def test_sum_is_exact_with_30pct_dropout_after_masking_and_before_masking():
    v = vectors(10)
    # d01, d02 drop after sharing keys (before masking): their pairwise masks are rebuilt from shares;
    # d03 drops after masking (before revealing): its input counts, its bᵢ is rebuilt from others
    total, srv, _ = run_local(v, drop_before_mask=("d01", "d02"), drop_before_reveal=("d03",))
    want = sum(x for k, x in v.items() if k not in ("d01", "d02"))
    np.testing.assert_allclose(total, want, atol=1e-6)
    assert srv.dropped == ("d01", "d02") and "d03" in srv.survivors


def test_too_many_dropouts_fail_with_a_reason():
    v = vectors(10)
    with pytest.raises(sa.SecAggError, match="threshold 7"):
        run_local(v, drop_before_mask=("d01", "d02", "d03", "d04"))


def test_masked_vector_alone_reveals_nothing_like_the_input():
    v = vectors(3, length=2000)
    session = "s1"
    clients = {c: sa.SecAggClient(session, c) for c in v}
    srv = sa.SecAggServer(session, 2000, min_clients=2)
    for c, cl in clients.items():
        srv.on_advertise(c, cl.advertise())
    roster = srv.close_advertise()
    for c, cl in clients.items():
        srv.on_shares(c, cl.on_roster(roster))
    boxes = srv.close_share()
    m = clients[boxes[0].to].on_inbox(boxes[0], v[boxes[0].to])
    # the words are uniform in Z/2^64: the top bit is set about half of the time
    assert 0.45 < float(np.mean(m.vector >> np.uint64(63))) < 0.55


def session_to_reveal(n=5, length=4, drop=()):
    v = vectors(n, length)
    clients = {c: sa.SecAggClient("s", c) for c in v}
    srv = sa.SecAggServer("s", length, max_dropout=0.4, min_clients=2)
    for c, cl in clients.items():
        srv.on_advertise(c, cl.advertise())
    roster = srv.close_advertise()
    for c, cl in clients.items():
        srv.on_shares(c, cl.on_roster(roster))
    for box in srv.close_share():
        if box.to not in drop:
            srv.on_masked(box.to, clients[box.to].on_inbox(box, v[box.to]))
    req = srv.close_mask()
    return v, clients, srv, req


def test_malformed_share_is_refused_and_the_rest_unmask():
    v, clients, srv, req = session_to_reveal(5, drop=("d04",))
    bad = clients["d00"].on_unmask(req)
    broken = dataclasses.replace(bad, b_shares={**bad.b_shares, "d01": (bad.b_shares["d01"][0], b"short")})
    with pytest.raises(sa.SecAggError, match="malformed b share for d01"):
        srv.on_reveal("d00", broken)
    for c in ("d01", "d02", "d03"):
        srv.on_reveal(c, clients[c].on_unmask(req))
    total = srv.result()
    np.testing.assert_allclose(total, sum(x for k, x in v.items() if k != "d04"), atol=1e-6)
    assert ("d00", "malformed b share for d01") in srv.refused


def test_wrong_but_well_formed_share_is_found_and_named():
    v, clients, srv, req = session_to_reveal(5)
    reveals = {c: clients[c].on_unmask(req) for c in req.survivors}
    r = reveals["d00"]
    idx, share = r.b_shares["d02"]
    reveals["d00"] = dataclasses.replace(r, b_shares={**r.b_shares, "d02": (idx, bytes(16))})
    for c, m in reveals.items():
        srv.on_reveal(c, m)
    np.testing.assert_allclose(srv.result(), sum(v.values()), atol=1e-6)
    assert ("d00", "wrong share for d02") in srv.refused


def test_replayed_masks_are_refused():
    v = vectors(4, 3)
    clients = {c: sa.SecAggClient("s2", c) for c in v}
    srv = sa.SecAggServer("s2", 3, max_dropout=0.25, min_clients=2)
    for c, cl in clients.items():
        srv.on_advertise(c, cl.advertise())
    roster = srv.close_advertise()
    for c, cl in clients.items():
        srv.on_shares(c, cl.on_roster(roster))
    boxes = {b.to: b for b in srv.close_share()}
    m0 = clients["d00"].on_inbox(boxes["d00"], v["d00"])
    srv.on_masked("d00", m0)
    with pytest.raises(sa.SecAggError, match="twice"):
        srv.on_masked("d00", m0)                                   # the same message again
    with pytest.raises(sa.SecAggError, match="another client"):
        srv.on_masked("d01", dataclasses.replace(m0, client="d01"))  # d00's mask under d01's name
    with pytest.raises(sa.SecAggError, match="replayed"):
        srv.on_masked("d02", dataclasses.replace(m0, session="old", client="d02"))   # from another session
    with pytest.raises(sa.SecAggError, match="names 'd00'"):
        srv.on_masked("d03", m0)                                   # sent by someone else
    for c in ("d01", "d02", "d03"):
        srv.on_masked(c, clients[c].on_inbox(boxes[c], v[c]))
    req = srv.close_mask()
    for c in req.survivors:
        srv.on_reveal(c, clients[c].on_unmask(req))
    np.testing.assert_allclose(srv.result(), sum(v.values()), atol=1e-6)
    assert len(srv.refused) == 4


def test_client_refuses_a_request_that_would_unmask_it():
    v, clients, srv, req = session_to_reveal(5)
    evil = sa.UnmaskRequest("s", req.survivors, ("d01",))            # d01 both survivor and dropped
    with pytest.raises(sa.SecAggError, match="both secrets"):
        clients["d00"].on_unmask(evil)
    few = sa.UnmaskRequest("s", ("d00", "d01"), ("d02", "d03", "d04"))
    with pytest.raises(sa.SecAggError, match="threshold"):
        clients["d00"].on_unmask(few)


def test_client_refuses_a_minority_threshold_and_foreign_keys():
    c = sa.SecAggClient("s", "a")
    ad = c.advertise()
    other = sa.SecAggClient("s", "b").advertise()
    third = sa.SecAggClient("s", "c").advertise()
    ros = sa.Roster("s", 1, tuple(sorted((x.client, x.c_pk, x.s_pk) for x in (ad, other, third))), 3)
    with pytest.raises(sa.SecAggError, match="majority"):
        c.on_roster(ros)
    c2 = sa.SecAggClient("s", "a")
    c2.advertise()
    with pytest.raises(sa.SecAggError, match="own keys"):
        c2.on_roster(dataclasses.replace(ros, threshold=2))


def test_wire_round_trip_and_malformed_bodies():
    v = vectors(3, 5)
    total, srv, sizes = run_local(v, max_dropout=0.0)
    assert sizes["masked"] > 3 * 5 * 8 and all(s > 0 for s in sizes.values())
    m = sa.Masked("s", "a", np.arange(5, dtype=np.uint64) * np.uint64(2 ** 62))
    body, tensors = to_wire(m)
    back = from_wire(body, tensors)
    assert np.array_equal(back.vector, m.vector) and back.client == "a"
    r = sa.Reveal("s", "a", {"b": (2, b"x" * 16)}, {"c": (2, b"y" * 32)})
    assert from_wire(*to_wire(r)) == r
    for bad in ({"stage": "reveal", "session": "s", "client": "a", "b_shares": {"b": [2]}, "sk_shares": {}},
                {"stage": "advertise", "session": "s", "client": "a", "c_pk": "@@@", "s_pk": ""},
                {"stage": "masked", "session": "s", "client": "a"},
                {"stage": "nope", "session": "s"},
                {"session": "s"}):
        with pytest.raises(sa.SecAggError):
            from_wire(bad, None)
    assert size_of(m) > 40
