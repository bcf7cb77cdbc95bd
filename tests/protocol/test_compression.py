import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from protocol.compression import CompressionError, Compressor, decode_head, decode_update

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


CONFIGS = [dict(zstd=False), dict(), dict(int8=True), dict(topk=0.1, zstd=False), dict(topk=0.1, int8=True)]


@pytest.mark.parametrize("opts", CONFIGS)
def test_every_truncation_and_any_trailing_garbage_is_refused(opts):
    blob = Compressor(**opts).encode(delta(3))
    decode_update(blob, SHAPES)                                   # whole: fine
    for n in range(len(blob)):                                    # every strict prefix fails, cleanly
        with pytest.raises(CompressionError):
            decode_update(blob[:n], SHAPES)
    for tail in (b"\x00", b"garbage", blob):
        with pytest.raises(CompressionError):
            decode_update(blob + tail, SHAPES)


def test_random_bytes_are_refused():
    rng = np.random.default_rng(1)
    for n in (0, 3, 11, 50, 400, 5000):
        with pytest.raises(CompressionError):
            decode_update(rng.integers(0, 256, n, dtype=np.uint8).tobytes(), SHAPES)


def test_head_delta_stage_and_reported_ratio():
    rng = np.random.default_rng(2)
    glob = {k: rng.normal(0, 1, s).astype(np.float32) for k, s in SHAPES.items()}
    local = {k: v + delta(4)[k] for k, v in glob.items()}
    c = Compressor(zstd=False)
    back = decode_head(c.encode_head(local, glob), glob)
    for k in glob:
        np.testing.assert_allclose(back[k], local[k], atol=1e-6)
    raw = 4 * (64 * 10 + 10)
    assert c.last.raw_bytes == raw and c.last.kept == c.last.total == 650
    assert c.last.wire_bytes == 11 + 8 * 2 + raw and c.last.ratio == pytest.approx(raw / (11 + 16 + raw))
    c2 = Compressor(topk=0.1, int8=True, zstd=False)
    blob = c2.encode_head(local, glob)
    # ceil(0.1 * 640) = 64 and ceil(0.1 * 10) = 1 values kept, after the 27-byte header (11 + 8 per
    # tensor): the 640-value tensor's indices as an 80-byte bitmap (< 64 uint16 indices) + 64 int8
    # values; the 10-value tensor's one uint16 index (its 2-byte bitmap is not smaller) + 1 value
    assert c2.last.kept == 64 + 1 and c2.last.wire_bytes == len(blob) == 27 + (80 + 64) + (2 + 1)
    assert c2.last.ratio == pytest.approx(2600 / 174)
    with pytest.raises(ValueError, match="local tensors"):
        c.encode_head({"x": np.zeros(3)}, glob)


def test_config_from_a_task_is_validated_by_name():
    assert Compressor.from_config({"topk": 0.05, "int8": True}).topk == 0.05
    assert Compressor.from_config(None) == Compressor()
    for bad, msg in (({"top_k": 0.1}, "unknown compression settings: top_k"), ({"int8": "yes"}, "int8"),
                     ({"topk": "0.1"}, "topk"), ({"topk": 2.0}, "topk"), ({"level": 99}, "level"),
                     ({"level": 2.5}, "level")):
        with pytest.raises(ValueError, match=msg):
            Compressor.from_config(bad)
    with pytest.raises(ValueError, match="NaN"):
        Compressor().encode({"dense0.weight": np.full((64, 10), np.nan), "dense0.bias": np.zeros(10)})


def test_residual_of_another_shape_is_not_applied():
    c = Compressor(topk=0.1, zstd=False)
    c.encode(delta())
    small = {"dense0.weight": np.ones((8, 10), np.float32), "dense0.bias": np.ones(10, np.float32)}
    back = decode_update(c.encode(small), {k: v.shape for k, v in small.items()})
    assert np.count_nonzero(back["dense0.weight"]) == 8 and set(back["dense0.weight"][back["dense0.weight"] != 0]) == {1.0}


def test_bitmap_indices_round_trip_and_refuse_bad_bitmaps():
    from protocol.compression import uses_bitmap

    rng = np.random.default_rng(3)
    delta = {"w": rng.normal(size=(40, 50)).astype(np.float32)}
    c = Compressor(topk=0.25, int8=False, zstd=False, error_feedback=False)
    blob = c.encode(delta)
    assert uses_bitmap(500, 2000) and len(blob) == 11 + 8 + 250 + 4 * 500
    out = decode_update(blob, {"w": (40, 50)})
    kept = np.abs(delta["w"]) >= np.sort(np.abs(delta["w"]).ravel())[-500]
    np.testing.assert_array_equal(out["w"][kept], delta["w"][kept])
    assert np.count_nonzero(out["w"]) == 500
    flipped = bytearray(blob)
    flipped[11 + 8] ^= 0xFF                     # marks no longer match the header's count
    with pytest.raises(CompressionError):
        decode_update(bytes(flipped), {"w": (40, 50)})
    small = Compressor(topk=0.5, int8=True, zstd=False, error_feedback=False)
    b2 = bytearray(small.encode({"v": np.arange(1, 13, dtype=np.float32)}))   # 12 values: a 2-byte bitmap
    b2[11 + 8 + 1] |= 0x80                      # a padding bit beyond value 12
    with pytest.raises(CompressionError, match="padding|marks"):
        decode_update(bytes(b2), {"v": (12,)})
