"""ControlChannel: what devices act on is built, signed and sent in one place (no broker)."""
import time

import numpy as np
import pytest

from controller.channel import ControlChannel, load_signing_key
from protocol import rollout as _rollout_kinds  # noqa: F401 - registers xfer.* kinds
from protocol.binary import decode_frame
from protocol.cmdauth import CommandVerifier, verify_frame
from protocol.config_loader import ConfigError
from protocol.envelope import decode
from protocol.signing import SignatureError, generate, save_keypair
from protocol.topics import Topics

TOPICS = Topics("edgefleet")


class Recorder:
    def __init__(self, ok: bool = True) -> None:
        self.sent: list[tuple[str, bytes, int, bool]] = []
        self.ok = ok

    def __call__(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> bool:
        self.sent.append((topic, payload, qos, retain))
        return self.ok


def channel(key=None, ok=True):
    rec = Recorder(ok)
    return ControlChannel(TOPICS, "ctl", rec, key), rec


def test_a_signed_command_is_accepted_by_the_device_verifier():
    key = generate()
    ch, rec = channel(key)
    assert ch.command("pi-1", "ping", {"n": 1})
    [(topic, payload, qos, retain)] = rec.sent
    assert (topic, qos, retain) == (TOPICS.cmd("pi-1"), 1, False)
    env = decode(payload)
    assert (env.kind, env.sender, dict(env.body)) == ("cmd", "ctl", {"command": "ping", "args": {"n": 1}})
    assert CommandVerifier([key.public_key()]).verify(env, topic, time.time()) == env.auth["key_id"]


def test_the_signature_binds_the_device_topic():
    key = generate()
    ch, rec = channel(key)
    ch.send("pi-1", "fl.ack", {"run_id": "r", "round": 1, "accepted": True, "reason": ""})
    topic, payload, _, _ = rec.sent[0]
    with pytest.raises(SignatureError, match="bad command signature"):
        CommandVerifier([key.public_key()]).verify(decode(payload), TOPICS.cmd("pi-2"), time.time())


def test_a_signed_frame_covers_its_tensors_and_its_blob():
    key = generate()
    ch, rec = channel(key)
    head = {"dense0.weight": np.ones((2, 3), np.float32)}
    ch.send_frame("pi-1", "fl.head", {"run_id": "r", "version": 1}, tensors=head)
    ch.send_frame("pi-1", "xfer.chunk", {"transfer_id": "t", "index": 0}, blob=b"chunk")
    v = CommandVerifier([key.public_key()])
    (t1, p1, _, _), (t2, p2, _, _) = rec.sent
    task, chunk = decode_frame(p1), decode_frame(p2)
    assert verify_frame(v, task, t1, time.time()) and verify_frame(v, chunk, t2, time.time())
    assert np.array_equal(task.tensors["dense0.weight"], head["dense0.weight"]) and chunk.blob == b"chunk"


def test_group_commands_are_signed_for_the_group_topic():
    key = generate()
    ch, rec = channel(key)
    ch.command_group("lab", "ping")
    topic, payload, _, _ = rec.sent[0]
    assert topic == TOPICS.group_cmd("lab")
    assert CommandVerifier([key.public_key()]).verify(decode(payload), topic, time.time())


def test_without_a_key_messages_go_unsigned():
    ch, rec = channel()
    assert not ch.signed
    ch.command("pi-1", "ping")
    ch.send_frame("pi-1", "fl.head", {"run_id": "r", "version": 2}, tensors={"w": np.zeros(2, np.float32)})
    assert decode(rec.sent[0][1]).auth is None
    assert decode_frame(rec.sent[1][1]).envelope.auth is None
    with pytest.raises(SignatureError, match="unsigned"):
        CommandVerifier([generate().public_key()]).verify(decode(rec.sent[0][1]), rec.sent[0][0], time.time())


def test_desired_state_is_retained_and_not_a_command():
    ch, rec = channel(generate())
    ch.set_desired("pi-1", {"version": "1.0.1", "bundle_sha256": "ab", "rollout_id": "ro-1"})
    topic, payload, qos, retain = rec.sent[0]
    env = decode(payload)
    assert (topic, qos, retain) == (TOPICS.desired("pi-1"), 1, True)
    assert env.kind == "ctl.state" and env.auth is None and env.body["version"] == "1.0.1"


def test_a_refused_publish_is_reported():
    ch, _ = channel(ok=False)
    assert ch.command("pi-1", "ping") is False


def test_command_envelope_for_request_response():
    key = generate()
    ch, _ = channel(key)
    topic, env = ch.command_envelope("pi-1", "ping", reply_to=TOPICS.reply("pi-1", "cli"), corr="c1")
    assert env.reply_to == TOPICS.reply("pi-1", "cli") and env.corr == "c1"
    assert CommandVerifier([key.public_key()]).verify(env, topic, time.time())


def test_load_signing_key(tmp_path):
    assert load_signing_key("") is None
    save_keypair(generate(), tmp_path / "k.pem", tmp_path / "k.pub")
    assert load_signing_key(str(tmp_path / "k.pem")) is not None
    with pytest.raises(ConfigError, match="security.signing_key"):
        load_signing_key(str(tmp_path / "missing.pem"))
