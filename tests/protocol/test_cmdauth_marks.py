"""Replay protection that survives a restart: the per-key high-water mark (issue 15, item 3)."""
import json

import pytest

from protocol.cmdauth import CommandVerifier, ReplayError, sign_envelope
from protocol.envelope import Envelope
from protocol.signing import SignatureError, generate, key_id

TOPIC = "edgefleet/v1/dev/pi-1/cmd"


def cmd(ts: float, name: str = "ping") -> Envelope:
    return Envelope(kind="cmd", sender="controller", body={"command": name, "args": {}}, ts=ts)


class Disk:
    """Stands in for the marks file: what was persisted, in order."""

    def __init__(self) -> None:
        self.saved: list[dict] = []

    def save(self, marks: dict) -> None:
        self.saved.append(json.loads(json.dumps(marks)))   # plain JSON data, as it goes to disk

    @property
    def last(self) -> dict:
        return self.saved[-1]


def test_a_restart_does_not_reopen_the_window():
    key = generate()
    disk = Disk()
    v = CommandVerifier([key.public_key()], max_skew_s=300, persist=disk.save)
    old = sign_envelope(cmd(1000.0, "model.rollback"), TOPIC, key)
    new = sign_envelope(cmd(1010.0), TOPIC, key)
    assert v.verify(old, TOPIC, 1011.0) and v.verify(new, TOPIC, 1011.0)
    assert disk.last[key_id(key.public_key())]["ts"] == 1010.0

    restarted = CommandVerifier([key.public_key()], max_skew_s=300, marks=disk.last, persist=disk.save)
    with pytest.raises(ReplayError, match="replayed"):
        restarted.verify(old, TOPIC, 1012.0)          # within the skew window, older than the mark
    with pytest.raises(ReplayError, match="replayed"):
        restarted.verify(new, TOPIC, 1012.0)          # the very last accepted one
    fresh_but_older = sign_envelope(cmd(1005.0), TOPIC, key)
    with pytest.raises(ReplayError):
        restarted.verify(fresh_but_older, TOPIC, 1012.0)
    later = sign_envelope(cmd(1011.0), TOPIC, key)
    assert restarted.verify(later, TOPIC, 1012.0)
    assert disk.last[key_id(key.public_key())]["ts"] == 1011.0


def test_reordering_within_one_run_is_not_a_replay():
    """Two publishers (fleetctl and the service) sign with one key; their messages may cross."""
    key = generate()
    disk = Disk()
    v = CommandVerifier([key.public_key()], persist=disk.save)
    assert v.verify(sign_envelope(cmd(1010.0), TOPIC, key), TOPIC, 1011.0)
    assert v.verify(sign_envelope(cmd(1009.0), TOPIC, key), TOPIC, 1011.0)
    assert disk.last[key_id(key.public_key())]["ts"] == 1010.0   # the mark never goes back


def test_same_timestamp_other_id_is_accepted_after_a_restart():
    key = generate()
    disk = Disk()
    v = CommandVerifier([key.public_key()], persist=disk.save)
    a = sign_envelope(cmd(1000.0), TOPIC, key)
    assert v.verify(a, TOPIC, 1000.0)
    r = CommandVerifier([key.public_key()], marks=disk.last, persist=disk.save)
    b = sign_envelope(cmd(1000.0), TOPIC, key)
    assert b.id != a.id and r.verify(b, TOPIC, 1000.0)
    with pytest.raises(ReplayError):
        CommandVerifier([key.public_key()], marks=disk.last).verify(a, TOPIC, 1000.0)


def test_bounded_memory_raises_the_floor_instead_of_forgetting():
    key = generate()
    v = CommandVerifier([key.public_key()], remember=3)
    envs = [sign_envelope(cmd(1000.0 + i), TOPIC, key) for i in range(5)]
    for e in envs:
        v.verify(e, TOPIC, 1010.0)
    for e in envs:   # the two evicted ids are below the raised floor, the others still remembered
        with pytest.raises(ReplayError):
            v.verify(e, TOPIC, 1010.0)
    with pytest.raises(ReplayError):   # conservative: below the floor, it cannot be told from a replay
        v.verify(sign_envelope(cmd(1000.5), TOPIC, key), TOPIC, 1010.0)
    assert v.verify(sign_envelope(cmd(1001.5), TOPIC, key), TOPIC, 1010.0)


def test_nothing_is_accepted_unless_its_mark_is_persisted():
    key = generate()

    def broken(marks: dict) -> None:
        raise OSError(28, "No space left on device")

    v = CommandVerifier([key.public_key()], persist=broken)
    e = sign_envelope(cmd(1000.0), TOPIC, key)
    with pytest.raises(SignatureError, match="cannot record"):
        v.verify(e, TOPIC, 1000.0)
    ok = CommandVerifier([key.public_key()])
    assert ok.verify(e, TOPIC, 1000.0)   # it was not marked as seen by the failed attempt either


def test_unreadable_marks_fail_closed_to_the_start_time():
    key = generate()
    e = sign_envelope(cmd(1000.0), TOPIC, key)
    v = CommandVerifier([key.public_key()], floor=1000.5)
    with pytest.raises(ReplayError):
        v.verify(e, TOPIC, 1001.0)
    assert v.verify(sign_envelope(cmd(1001.0), TOPIC, key), TOPIC, 1001.0)


def test_the_marks_file_is_written_atomically(tmp_path):
    from agent.core.replaymarks import MarksFile

    f = MarksFile(tmp_path / "command-marks.json")
    assert f.load() == ({}, None)
    f.save({"k1": {"ts": 5.0, "ids": ["a"]}})
    assert f.load() == ({"k1": {"ts": 5.0, "ids": ["a"]}}, None)
    assert [p.name for p in tmp_path.iterdir()] == ["command-marks.json"]
    (tmp_path / "command-marks.json").write_text("{not json")
    marks, problem = f.load()
    assert marks == {} and "unreadable" in problem
    (tmp_path / "command-marks.json").write_text('{"k1": {"ts": "x"}}')
    assert "unreadable" in f.load()[1]


def test_harmless_kinds_do_not_wait_on_the_disk_but_are_still_checked_and_saved_with_the_next():
    key = generate()
    disk = Disk()
    v = CommandVerifier([key.public_key()], max_skew_s=300, persist=disk.save)
    chunks = [sign_envelope(cmd(1000.0 + i, "chunk"), TOPIC, key) for i in range(5)]
    for c in chunks:
        assert v.verify(c, TOPIC, 1010.0, durable=False)
    assert disk.saved == []                                  # no write per chunk
    with pytest.raises(ReplayError):
        v.verify(chunks[2], TOPIC, 1010.0, durable=False)    # still refused twice in one run
    assert v.verify(sign_envelope(cmd(1006.0), TOPIC, key), TOPIC, 1010.0)
    assert disk.last[key_id(key.public_key())]["ts"] == 1006.0
