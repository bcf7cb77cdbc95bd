"""Rollout message kinds: offers, wants, chunk headers and update events are validated on arrival."""
import copy

import pytest

from protocol import rollout as ro
from protocol.chunks import make_manifest
from protocol.envelope import DecodeError, Envelope, decode, encode

SHA = "a" * 64


def offer(**over):
    body = {"rollout_id": "ro-1", "target": {"version": "1.1.0", "bundle_sha256": SHA},
            "base": {"version": "1.0.0", "bundle_sha256": "b" * 64},
            "transfer": make_manifest("t" * 32, b"x" * 5000, 1024).to_dict(), "allow_downgrade": False}
    body.update(over)
    return body


def roundtrip(kind, body):
    return decode(encode(Envelope(kind=kind, sender="controller", body=body)))


def test_good_messages_decode():
    env = roundtrip("model.offer", offer())
    assert ro.offer_manifest(env.body).count == 5
    assert roundtrip("model.offer", offer(base=None, rollout_id=None)).body["base"] is None
    assert roundtrip("xfer.want", {"transfer_id": "t1", "chunks": [0, 5], "have": 3, "total": 9}).body["chunks"] == [0, 5]
    assert roundtrip("xfer.chunk", {"transfer_id": "t1", "index": 7}).body["index"] == 7


def _broken_transfer():
    b = offer()
    b["transfer"] = copy.deepcopy(b["transfer"])
    b["transfer"]["chunk_sha256"].pop()
    return b


@pytest.mark.parametrize("kind,body,field", [
    ("model.offer", offer(target={"version": "1.1.0", "bundle_sha256": "XYZ"}), "bundle_sha256"),
    ("model.offer", offer(target={"version": "", "bundle_sha256": SHA}), "target.version"),
    ("model.offer", offer(target=None), "target"),
    ("model.offer", _broken_transfer(), "transfer"),
    ("model.offer", offer(transfer={"transfer_id": "x"}), "transfer"),
    ("model.offer", offer(allow_downgrade="yes"), "allow_downgrade"),
    ("model.offer", offer(rollout_id="r" * 65), "rollout_id"),
    ("xfer.want", {"transfer_id": "t", "chunks": list(range(65))}, "chunks"),
    ("xfer.want", {"transfer_id": "t", "chunks": [-1]}, "chunks"),
    ("xfer.want", {"transfer_id": "t", "chunks": [True]}, "chunks"),
    ("xfer.want", {"transfer_id": "", "chunks": []}, "transfer_id"),
    ("xfer.want", {"transfer_id": "t", "chunks": [], "have": -3}, "have"),
    ("xfer.chunk", {"transfer_id": "t", "index": 70000}, "index"),
    ("xfer.chunk", {"transfer_id": "t"}, "index"),
])
def test_bad_messages_are_refused_with_the_field(kind, body, field):
    with pytest.raises(DecodeError) as e:
        roundtrip(kind, body)
    assert field in (e.value.field or "") or field in str(e.value)


@pytest.mark.parametrize("body,ok", [
    ({"status": "applied", "rollout_id": "r", "version": "1.0"}, True),
    ({"status": "exploded"}, False),
    ({"status": "failed", "reason": 3}, False),
    ({"status": "failed", "bundle_sha256": "zz"}, False),
])
def test_update_event_bodies(body, ok):
    if ok:
        ro.check_update_event(body)
    else:
        with pytest.raises(DecodeError):
            ro.check_update_event(body)
