import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.compression import CompressionError, Compressor, decode_update

SHAPES = {"dense0.weight": (64, 10), "dense0.bias": (10,)}


def delta(seed=0):
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("opts", [dict(), dict(int8=True), dict(topk=0.1), dict(topk=0.1, int8=True),
                                  dict(topk=0.05, int8=True, zstd=False)])
def test_round_trip_and_ratio(opts):
    d = delta()
    c = Compressor(**opts)
    blob = c.encode(d)
    back = decode_update(blob, SHAPES)
    raw = sum(v.nbytes for v in d.values())
    if not opts.get("topk") and not opts.get("int8"):
        for k in d:
            np.testing.assert_allclose(back[k], d[k])
    if opts.get("int8") and not opts.get("topk"):
        for k in d:
            assert np.abs(back[k] - d[k]).max() <= np.abs(d[k]).max() / 127 + 1e-7
    if opts.get("topk") == 0.05 and opts.get("int8"):
        assert raw / len(blob) >= 15
    if opts.get("topk") == 0.1 and opts.get("int8"):
        assert raw / len(blob) >= 8


def test_error_feedback_sends_what_was_left_out_later():
    d = delta()
    c = Compressor(topk=0.1, int8=False)
    total = {k: np.zeros_like(v) for k, v in d.items()}
    for _ in range(30):
        got = decode_update(c.encode(d), SHAPES)
        for k in total:
            total[k] += got[k]
    # after 30 rounds the sum of what was sent tracks 30 x the true delta (residual stays bounded)
    for k in d:
        assert np.abs(total[k] - 30 * d[k]).max() <= np.abs(c.residual[k]).max() + 1e-5


def test_corrupt_inputs_are_refused():
    blob = Compressor(topk=0.2, int8=True).encode(delta())
    for bad in (blob[:5], blob[:-1], blob + b"x", b"XXXX" + blob[4:], b""):
        with pytest.raises(CompressionError):
            decode_update(bad, SHAPES)
    with pytest.raises(CompressionError, match="do not match"):
        decode_update(blob, {"other": (3,)})
    with pytest.raises(CompressionError, match="do not match"):  # same names, other shapes: checksum differs
        decode_update(blob, {"dense0.weight": (10, 64), "dense0.bias": (10,)})


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 2000), st.integers(0, 255))
def test_fuzz_decoder(data, pos, val):
    good = bytearray(Compressor(topk=0.3, int8=True, zstd=False).encode(delta()))
    good[pos % len(good)] = val
    for b in (bytes(good), data, b"EFU2" + data):
        try:
            decode_update(b, SHAPES)
        except CompressionError:
            pass
