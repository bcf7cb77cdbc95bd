import pytest

from protocol.cmdauth import CommandVerifier, sign_envelope
from protocol.envelope import Envelope, decode, encode
from protocol.signing import SignatureError, generate

TOPIC = "edgefleet/v1/dev/pi-1/cmd"


def cmd(ts=1000.0):
    return Envelope(kind="cmd", sender="controller", body={"command": "ping", "args": {}}, ts=ts)


def test_signed_command_survives_the_wire_and_verifies():
    key = generate()
    wire = encode(sign_envelope(cmd(1000.123456789), TOPIC, key))
    v = CommandVerifier([key.public_key()])
    assert v.verify(decode(wire), TOPIC, now=1001.0)


@pytest.mark.parametrize("case,msg", [
    ("unsigned", "unsigned"), ("other_key", "not trusted"), ("retarget", "bad command signature"),
    ("altered", "bad command signature"), ("stale", "timestamp"), ("replay", "replayed"),
])
def test_refusals(case, msg):
    key = generate()
    v = CommandVerifier([key.public_key()], max_skew_s=60)
    env = sign_envelope(cmd(), TOPIC, key)
    topic, now = TOPIC, 1000.0
    if case == "unsigned":
        env = cmd()
    elif case == "other_key":
        env = sign_envelope(cmd(), TOPIC, generate())
    elif case == "retarget":
        topic = "edgefleet/v1/dev/pi-2/cmd"
    elif case == "altered":
        env = decode(encode(env).replace(b'"ping"', b'"pong"'))
    elif case == "stale":
        now = 2000.0
    elif case == "replay":
        v.verify(env, topic, now)
    with pytest.raises(SignatureError, match=msg):
        v.verify(env, topic, now)


def test_signed_frame_covers_the_tensors():
    import numpy as np

    from protocol.binary import decode_frame
    from protocol.cmdauth import sign_frame, verify_frame
    from protocol.envelope import register_kind

    register_kind("test.frame", lambda body: None)
    key = generate()
    v = CommandVerifier([key.public_key()])
    env = Envelope(kind="test.frame", sender="controller", body={"round": 1}, ts=1000.0)
    data = sign_frame(env, TOPIC, key, {"w": np.ones(4, np.float32)})
    assert verify_frame(v, decode_frame(data), TOPIC, 1000.0)
    # same signed envelope, other tensors (hash recomputed so the frame itself is well-formed)
    from protocol.binary import encode_frame
    forged = encode_frame(decode_frame(data).envelope, {"w": np.zeros(4, np.float32)})
    with pytest.raises(SignatureError, match="payload hash"):
        verify_frame(CommandVerifier([key.public_key()]), decode_frame(forged), TOPIC, 1000.0)
