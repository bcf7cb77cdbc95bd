"""Consistent Overhead Byte Stuffing: two pure functions and one error (cobs-python's shape).

COBS removes every 0x00 from a frame (at most one extra byte per 254), so 0x00 can delimit
frames on the serial line and a receiver resynchronises on the next delimiter after any
garbage. Framing (adding/splitting on 0x00) is the caller's job.
"""
from __future__ import annotations


class DecodeError(ValueError):
    """The bytes are not a valid COBS encoding."""


def encode(data: bytes) -> bytes:
    out = bytearray()
    block = bytearray()
    for b in data:
        if b == 0:
            out.append(len(block) + 1)
            out += block
            block.clear()
        else:
            block.append(b)
            if len(block) == 254:
                out.append(255)
                out += block
                block.clear()
    out.append(len(block) + 1)
    out += block
    return bytes(out)


def decode(data: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise DecodeError(f"zero byte at offset {i} inside a COBS frame")
        end = i + code
        if end > n:
            raise DecodeError(f"block at offset {i} claims {code - 1} bytes, only {n - i - 1} left")
        block = data[i + 1:end]
        if 0 in block:
            raise DecodeError("zero byte inside a COBS block")
        out += block
        i = end
        if code < 255 and i < n:
            out.append(0)
    return bytes(out)
