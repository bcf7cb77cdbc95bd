import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.binary import decode_frame, encode_frame, is_frame
from protocol.envelope import DecodeError, Envelope, register_kind

register_kind("test.tensors", lambda body: None)


def make(blob=b""):
    env = Envelope(kind="test.tensors", sender="pi-1", body={"round": 3}, ts=1700000000.5)
    tensors = {"dense0.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "q": np.array([-128, 0, 127], dtype=np.int8), "empty": np.zeros((0, 5), np.float64)}
    return env, tensors, encode_frame(env, tensors, blob)


def test_round_trip_tensors_and_blob():
    env, tensors, data = make(b"\x00\x01chunk")
    assert is_frame(data)
    f = decode_frame(data, expect_sender="pi-1")
    assert f.envelope == env
    assert f.blob == b"\x00\x01chunk"
    assert set(f.tensors) == set(tensors)
    for k, v in tensors.items():
        assert f.tensors[k].dtype == v.dtype and f.tensors[k].shape == v.shape
        np.testing.assert_array_equal(f.tensors[k], v)
    f.tensors["q"][0] = 5  # decoded arrays are writable copies, not views of the payload


def test_every_truncation_is_rejected_cleanly():
    _, _, data = make(b"xyz")
    for n in range(len(data)):
        with pytest.raises(DecodeError):
            decode_frame(data[:n])


def test_trailing_garbage_is_caught_by_the_payload_hash():
    _, _, data = make()
    with pytest.raises(DecodeError) as ei:
        decode_frame(data + b"garbage")
    assert ei.value.reason == "bad_frame" and ei.value.field == "payload_sha256"


def test_payload_bit_flip_is_caught():
    _, _, data = make(b"blob")
    b = bytearray(data)
    b[-1] ^= 0x01
    with pytest.raises(DecodeError, match="SHA-256"):
        decode_frame(bytes(b))


@pytest.mark.parametrize("mutate,reason", [
    (lambda b: b"XX" + b[2:], "bad_frame"),
    (lambda b: b[:2] + b"\x09" + b[3:], "schema"),
    (lambda b: b[:3] + b"\x01" + b[4:], "bad_frame"),
    (lambda b: b.replace(b'"dtype":"float32"', b'"dtype":"object!"'), "field"),
    (lambda b: b.replace(b'"shape":[3,4]', b'"shape":[4,4]'), "field"),
])
def test_corrupt_frames(mutate, reason):
    _, _, data = make()
    with pytest.raises(DecodeError) as ei:
        decode_frame(mutate(data))
    assert ei.value.reason == reason


def test_oversize_and_sender_checks():
    _, _, data = make()
    with pytest.raises(DecodeError, match="oversize"):
        decode_frame(data, max_bytes=16)
    with pytest.raises(DecodeError, match="sender_mismatch"):
        decode_frame(data, expect_sender="pi-2")


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_escape(data):
    try:
        decode_frame(b"EF\x01\x00" + data)
    except DecodeError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_single_byte_flips_never_escape(pos, val):
    _, _, data = make(b"blob")
    b = bytearray(data)
    b[pos % len(b)] = val
    try:
        decode_frame(bytes(b))
    except DecodeError:
        pass
