"""Where to answer a message we will not decode (too big, corrupt): pure, bounded, no allocation
proportional to the payload.

A refused request must still get its error reply (``oversize``, ``bad_request``), so the agent
needs the requester's ``reply_to`` and ``corr`` without parsing a payload it has just refused.
MQTT 5 carries them as properties (the caller uses those first); otherwise:

* a binary frame (``protocol.binary``): only its header is read — it is capped at 64 KiB and comes
  first, whatever the size of the tensors behind it;
* a JSON envelope: only the first and last 4 KiB are searched. ``Envelope.to_dict`` writes
  ``reply_to`` and ``corr`` after the body, so they sit in the tail; other encoders may put them
  first. The values must look like what ``envelope.from_dict`` accepts.
"""
from __future__ import annotations

import json
import re
import struct

_PREFIX = struct.Struct("<2sBBI")
_MAX_HEADER = 64 * 1024
_WINDOW = 4096
_RT = re.compile(rb'"reply_to"\s*:\s*"([^"\\#+]{1,512})"')
_CORR = re.compile(rb'"corr"\s*:\s*"([^"\\]{1,64})"')


def _ok_topic(v: object) -> str | None:
    if isinstance(v, str) and 0 < len(v) <= 512 and "+" not in v and "#" not in v:
        return v
    return None


def _ok_corr(v: object) -> str | None:
    return v if isinstance(v, str) and 0 < len(v) <= 64 else None


def reply_fields(payload: bytes | bytearray | memoryview) -> tuple[str | None, str | None]:
    """``(reply_to, corr)`` as far as they can be read cheaply, else ``(None, None)``."""
    mv = memoryview(payload)
    if len(mv) >= _PREFIX.size and bytes(mv[:2]) == b"EF":
        _, _, _, hlen = _PREFIX.unpack_from(mv, 0)
        if hlen > _MAX_HEADER or _PREFIX.size + hlen > len(mv):
            return None, None
        try:
            header = json.loads(bytes(mv[_PREFIX.size:_PREFIX.size + hlen]))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None, None
        if not isinstance(header, dict):
            return None, None
        return _ok_topic(header.get("reply_to")), _ok_corr(header.get("corr"))
    tail = bytes(mv[-_WINDOW:])
    head = bytes(mv[:_WINDOW])
    rt = corr = None
    for chunk, last in ((tail, True), (head, False)):
        rts, corrs = _RT.findall(chunk), _CORR.findall(chunk)
        if rt is None and rts:
            rt = _ok_topic((rts[-1] if last else rts[0]).decode("utf-8", "replace"))
        if corr is None and corrs:
            corr = _ok_corr((corrs[-1] if last else corrs[0]).decode("utf-8", "replace"))
    return rt, corr
