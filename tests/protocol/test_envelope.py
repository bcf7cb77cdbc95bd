import json

import pytest
from hypothesis import given, settings, strategies as st

from protocol.envelope import DecodeError, Envelope, decode, encode


def good(**over):
    d = {"schema": 1, "kind": "telemetry", "id": "abc", "sender": "pi-1", "ts": 1.5,
         "body": {"seq": 1, "interval_s": 10}}
    d.update(over)
    return json.dumps(d).encode()


def test_round_trip():
    e = Envelope(kind="cmd", sender="controller", body={"command": "ping", "args": {}},
                 reply_to="edgefleet/v1/dev/pi-1/reply/c", corr="k1", ts=1700000000.25)
    back = decode(encode(e))
    assert back == e


@pytest.mark.parametrize("payload,reason,field", [
    (b"{not json", "bad_json", None),
    (b"\xff\xfe", "bad_json", None),
    (b"[1,2]", "bad_json", None),
    (good(schema=2), "schema", "schema"),
    (good(schema="1"), "schema", "schema"),
    (good(kind="nope"), "unknown_kind", "kind"),
    (good(kind=None), "field", "kind"),
    (good(id=""), "field", "id"),
    (good(sender="a/b"), "field", "sender"),
    (good(sender="+"), "field", "sender"),
    (good(ts=-1), "field", "ts"),
    (good(ts="now"), "field", "ts"),
    (good(body=[]), "field", "body"),
    (good(body={"interval_s": 10}), "field", "body.seq"),
    (good(body={"seq": "1", "interval_s": 10}), "field", "body.seq"),
    (good(body={"seq": True, "interval_s": 10}), "field", "body.seq"),
    (good(reply_to="a/+/b"), "field", "reply_to"),
    (good(corr=5), "field", "corr"),
])
def test_bad_input_names_reason_and_field(payload, reason, field):
    with pytest.raises(DecodeError) as ei:
        decode(payload)
    assert ei.value.reason == reason
    assert ei.value.field == field


def test_oversize_rejected_before_parsing():
    with pytest.raises(DecodeError) as ei:
        decode(good(), max_bytes=10)
    assert ei.value.reason == "oversize"


def test_sender_must_match_topic_device():
    with pytest.raises(DecodeError) as ei:
        decode(good(), expect_sender="pi-2")
    assert ei.value.reason == "sender_mismatch"
    assert decode(good(), expect_sender="pi-1").sender == "pi-1"


def test_nan_is_not_json():
    with pytest.raises(DecodeError):
        decode(b'{"schema":1,"kind":"telemetry","id":"a","sender":"p","ts":NaN,"body":{"seq":1,"interval_s":1}}')


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_decode_error(data):
    try:
        decode(data)
    except DecodeError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=10)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["schema", "kind", "id", "sender", "ts", "body", "reply_to", "corr"]),
                       json_values))
def test_random_objects_only_ever_raise_decode_error(obj):
    try:
        decode(json.dumps(obj).encode())
    except DecodeError:
        pass
