import re

import pytest

from protocol.topics import InvalidId, Topics, validate_id


@pytest.mark.parametrize("good", ["pi-07", "a", "jetson.nano_2", "gw:01", "A" * 64])
def test_valid_ids(good):
    assert validate_id(good) == good


@pytest.mark.parametrize("bad,why", [
    ("", "empty"), ("a/b", "'/'"), ("a+", "'+'"), ("#", "'#'"), ("a\nb", "control"),
    ("a\x00", "control"), ("$SYS", "'$'"), ("A" * 65, "1-64"), ("-lead", "starting"), ("sp ace", "letters"),
    (7, "string"), (None, "string"),
])
def test_invalid_ids_say_why(bad, why):
    with pytest.raises(InvalidId, match=re.escape(why)):
        validate_id(bad)


def test_tree_and_parse_round_trip():
    t = Topics("edgefleet")
    assert t.state("pi-1") == "edgefleet/v1/dev/pi-1/state"
    assert t.reply("pi-1", "cli-9") == "edgefleet/v1/dev/pi-1/reply/cli-9"
    assert t.all_devices("telemetry") == "edgefleet/v1/dev/+/telemetry"
    assert t.parse("edgefleet/v1/dev/pi-1/reply/cli-9") == ("pi-1", "reply", ("cli-9",))
    assert t.parse("edgefleet/v1/dev/pi-1/bogus") is None
    assert t.parse("other/v1/dev/pi-1/state") is None
    assert t.parse("edgefleet/v1/dev/$bad/state") is None


def test_topic_builders_refuse_wildcard_ids():
    t = Topics()
    with pytest.raises(InvalidId):
        t.state("+")
    with pytest.raises(InvalidId):
        t.group_cmd("a/#")


def test_reply_to_must_stay_in_own_subtree():
    t = Topics()
    assert t.is_own_reply("pi-1", "edgefleet/v1/dev/pi-1/reply")
    assert t.is_own_reply("pi-1", "edgefleet/v1/dev/pi-1/reply/x")
    assert not t.is_own_reply("pi-1", "edgefleet/v1/dev/pi-2/reply/x")
    assert not t.is_own_reply("pi-1", "edgefleet/v1/dev/pi-1/replyx")
    assert not t.is_own_reply("pi-1", "edgefleet/v1/dev/pi-1/cmd")
