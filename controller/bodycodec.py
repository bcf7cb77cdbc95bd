"""How a stored message body is laid out: zstd-compressed JSON, never serialised again on the way in.

The hot path stores the message as it came off the wire (``compress_envelope``: the envelope's
JSON bytes, already validated, so no ``json.dumps`` per message); a reader takes its ``body``.
A body built in code (``encode``) is serialised once, compactly.

A telemetry body is ~1.2 KB of JSON whose keys repeat in every sample: zstd makes it about half
of that alone, and about a fifth to a tenth with a dictionary trained on the registry's own
samples (``train``; dictionaries are kept in the registry, each frame names its dictionary id, so a
reader needs no other state). Rows written before this module (JSON text) still read.
"""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import zstandard as zstd

_MAGIC = b"\x28\xb5\x2f\xfd"   # a zstd frame: a body
_ENVELOPE = b"E"                  # then a zstd frame: a whole envelope as received


def dumps(body: Mapping[str, Any]) -> bytes:
    """The one serialisation of a body: compact, key order as sent."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class BodyCodec:
    """Encode with the current dictionary (if any); decode any frame, loading the dictionary it names."""

    def __init__(self, load_dict: Callable[[int], bytes | None] | None = None, level: int = 3) -> None:
        self.level = level
        self._load = load_dict
        self._cctx = zstd.ZstdCompressor(level=level)
        self._dicts: dict[int, zstd.ZstdCompressionDict] = {}
        self._dctx: dict[int, zstd.ZstdDecompressor] = {0: zstd.ZstdDecompressor()}
        self.dict_id = 0

    def use_dict(self, data: bytes) -> int:
        """Compress from now on with this dictionary; returns its id."""
        d = zstd.ZstdCompressionDict(data)
        self._dicts[d.dict_id()] = d
        self._dctx[d.dict_id()] = zstd.ZstdDecompressor(dict_data=d)
        self._cctx = zstd.ZstdCompressor(level=self.level, dict_data=d)
        self.dict_id = d.dict_id()
        return self.dict_id

    def encode(self, body: Mapping[str, Any]) -> bytes:
        return self.compress(dumps(body))

    def compress(self, raw_json: bytes) -> bytes:
        return self._cctx.compress(raw_json)

    def compress_envelope(self, payload: bytes) -> bytes:
        """A received envelope's bytes as they are (the reader takes ``body``)."""
        return _ENVELOPE + self._cctx.compress(payload)

    def decode(self, stored: bytes | memoryview | str | None) -> dict[str, Any] | None:
        if stored is None:
            return None
        if isinstance(stored, str):          # a row from before compression
            return json.loads(stored)
        data = bytes(stored)
        if data[:1] == _ENVELOPE:
            return json.loads(self._decompress(data[1:]))["body"]
        if not data.startswith(_MAGIC):
            return json.loads(data)
        return json.loads(self._decompress(data))

    def _decompress(self, data: bytes) -> bytes:
        did = zstd.get_frame_parameters(data).dict_id
        dctx = self._dctx.get(did)
        if dctx is None:
            raw = self._load(did) if self._load else None
            if raw is None:
                raise ValueError(f"stored body needs zstd dictionary {did}, which the registry does not have")
            self.use_dict_for_reading(raw)
            dctx = self._dctx[did]
        return dctx.decompress(data)

    def use_dict_for_reading(self, data: bytes) -> None:
        d = zstd.ZstdCompressionDict(data)
        self._dctx[d.dict_id()] = zstd.ZstdDecompressor(dict_data=d)


def train(samples: list[bytes], size: int = 16384) -> bytes:
    """A dictionary from JSON samples of one kind (a few hundred to a few thousand)."""
    return zstd.train_dictionary(size, samples).as_bytes()
