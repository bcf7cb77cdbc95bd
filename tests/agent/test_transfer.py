"""The resumable download, byte by byte and clock tick by clock tick: no broker, no files but a tmp dir."""
import hashlib
import os

import pytest
from hypothesis import given, settings, strategies as st

from agent.updates.transfer import PartFile, Transfer
from protocol.chunks import ChunkError, make_manifest


def blob_and_transfer(n_bytes=10_000, chunk=1000, window=4, retry_s=2.0):
    blob = os.urandom(n_bytes)
    m = make_manifest("t1", blob, chunk)
    return blob, Transfer(m, window=window, retry_s=retry_s)


def chunk(blob, i, size=1000):
    return blob[i * size:(i + 1) * size]


def test_window_slides_and_completes():
    blob, t = blob_and_transfer()
    assert t.wants(0.0) == [0, 1, 2, 3]
    assert t.wants(0.1) == []                       # window full
    assert t.accept(0, chunk(blob, 0)) is True
    assert t.wants(0.2) == []                       # only 1 of 4 free: wait for half the window
    t.accept(1, chunk(blob, 1))
    assert t.wants(0.3) == [4, 5]
    for i in [2, 3, 4, 5]:
        t.accept(i, chunk(blob, i))
    rest = t.wants(0.4)
    assert rest == [6, 7, 8, 9]
    for i in rest:
        t.accept(i, chunk(blob, i))
    assert t.complete and t.received_bytes == len(blob) and t.wants(0.5) == []


def test_lost_requests_are_asked_again_after_retry_s():
    blob, t = blob_and_transfer(retry_s=2.0)
    first = t.wants(0.0)
    t.accept(0, chunk(blob, 0))
    t.accept(1, chunk(blob, 1))
    assert t.wants(1.0) == [4, 5]
    again = t.wants(2.5)                            # 2 and 3 never came
    assert again == [2, 3] and t.rerequested == 2 and first == [0, 1, 2, 3]


def test_force_after_reconnect_forgets_what_was_in_flight():
    blob, t = blob_and_transfer()
    t.wants(0.0)
    assert t.wants(0.1, force=True) == [0, 1, 2, 3]


@pytest.mark.parametrize("index,data,msg", [
    (0, b"x" * 1000, "SHA-256 mismatch"),
    (0, b"x" * 999, "expected 1000"),               # truncated
    (9, b"x" * 1000, "SHA-256"),
    (10, b"x" * 1000, "out of range"),
    (-1, b"", "out of range"),
    (True, b"", "out of range"),
    ("3", b"", "out of range"),
])
def test_bad_chunks_are_refused_and_change_nothing(index, data, msg):
    _, t = blob_and_transfer()
    t.wants(0.0)
    with pytest.raises(ChunkError, match=msg):
        t.accept(index, data)
    assert not t.have and t.rejected == 1 and len(t.inflight) == 4


def test_duplicates_are_counted_not_stored_twice():
    blob, t = blob_and_transfer()
    assert t.accept(3, chunk(blob, 3))
    assert not t.accept(3, chunk(blob, 3))
    assert t.duplicates == 1 and t.have == {3}


def test_last_chunk_may_be_short():
    blob, t = blob_and_transfer(n_bytes=2500)
    assert t.count == 3 and t.expected_size(2) == 500
    for i in range(3):
        t.accept(i, blob[i * 1000:(i + 1) * 1000])
    assert t.complete


def test_part_file_survives_a_restart_and_rehashes(tmp_path):
    blob, t = blob_and_transfer()
    part = PartFile(tmp_path / "x", t.manifest)
    for i in (0, 2, 5):
        part.write(i, chunk(blob, i))
    part.write(7, b"\0" * 1000)                     # a chunk torn by a power cut
    again = PartFile(tmp_path / "x", t.manifest)
    assert again.held() == {0, 2, 5}
    t2 = Transfer(t.manifest, window=16, have=again.held())
    assert t2.wants(0.0) == [1, 3, 4, 6, 7, 8, 9]
    for i in t2.wants(0.0, force=True):
        again.write(i, chunk(blob, i))
    assert hashlib.sha256(again.read_all()).hexdigest() == t.manifest.sha256


def test_part_file_refuses_a_wrong_whole(tmp_path):
    blob, t = blob_and_transfer(n_bytes=2000)
    part = PartFile(tmp_path / "y", t.manifest)
    part.write(0, chunk(blob, 0))
    with pytest.raises(ChunkError):
        part.read_all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-2, 12), st.binary(max_size=1100)), max_size=40),
       st.integers(1, 16), st.floats(0.1, 5))
def test_random_chunk_streams_never_corrupt_the_state(stream, window, retry):
    blob, t = blob_and_transfer(window=window, retry_s=retry)
    now = 0.0
    for i, data in stream:
        now += 0.3
        t.wants(now)
        try:
            t.accept(i, data)
        except ChunkError:
            pass
        assert len(t.inflight) <= window
        assert all(0 <= j < t.count for j in t.have)
    # whatever happened, the right bytes still complete it
    for i in range(t.count):
        try:
            t.accept(i, chunk(blob, i))
        except ChunkError:
            raise AssertionError("a good chunk was refused")
    assert t.complete


def test_adaptive_window_grows_while_chunks_arrive_and_halves_on_a_timeout():
    blob = os.urandom(100_000)
    t = Transfer(make_manifest("t", blob, 1000), window=2, retry_s=0.5, max_window=16)
    now = 0.0
    for _ in range(6):                              # fast round trips: the window doubles per round
        for i in t.wants(now):
            now += 0.01
            t.accept(i, chunk(blob, i), now)
    assert t.window == 16 and t.srtt is not None and t.srtt < 0.2
    assert t.rto == 0.5                             # never below retry_s
    lost = t.wants(now)
    assert lost and t.window == 16
    t.wants(now + 0.6)                              # none of them came back in time
    assert t.window == 8 and t.rerequested == len(lost)


def test_rto_follows_a_slow_link_instead_of_re_requesting_everything():
    blob = os.urandom(50_000)
    t = Transfer(make_manifest("t", blob, 1000), window=4, retry_s=0.5, max_window=64)
    now = 0.0
    for _ in range(5):                              # each chunk takes 2 s: a slow cellular link
        for i in t.wants(now):
            t.accept(i, chunk(blob, i), now + 2.0)
        now += 2.0
    assert t.rto > 2.0 and t.rerequested == 0


def test_fixed_window_without_max_window():
    blob, t = blob_and_transfer(window=4)
    for i in t.wants(0.0):
        t.accept(i, chunk(blob, i), 0.1)
    assert t.window == 4 and t.rto == 2.0
