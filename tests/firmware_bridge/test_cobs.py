import pytest
from hypothesis import given, settings, strategies as st

from firmware_bridge.cobs import DecodeError, decode, encode

# known encodings (Cheshire & Baker, and the Wikipedia table)
TABLE = [
    (b"", b"\x01"),
    (b"\x00", b"\x01\x01"),
    (b"\x00\x00", b"\x01\x01\x01"),
    (b"\x11\x22\x00\x33", b"\x03\x11\x22\x02\x33"),
    (b"\x11\x22\x33\x44", b"\x05\x11\x22\x33\x44"),
    (b"\x11\x00\x00\x00", b"\x02\x11\x01\x01\x01"),
    (bytes(range(1, 255)), b"\xff" + bytes(range(1, 255)) + b"\x01"),
    (bytes(range(0, 255)), b"\x01\xff" + bytes(range(1, 255)) + b"\x01"),
    (bytes(range(1, 256)), b"\xff" + bytes(range(1, 255)) + b"\x02\xff"),
]


@pytest.mark.parametrize("raw,enc", TABLE)
def test_known_encodings(raw, enc):
    assert encode(raw) == enc
    assert decode(enc) == raw


@pytest.mark.parametrize("bad", [b"\x00", b"\x05\x11\x22", b"\x03\x11\x00", b"\x02\x00"])
def test_invalid_inputs_fail(bad):
    with pytest.raises(DecodeError):
        decode(bad)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=1200))
def test_round_trip_and_no_zero_bytes(data):
    enc = encode(data)
    assert 0 not in enc
    assert len(enc) <= len(data) + len(data) // 254 + 1
    assert decode(enc) == data


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_only_raise_decode_error(data):
    try:
        decode(data)
    except DecodeError:
        pass
