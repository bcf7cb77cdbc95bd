"""fleetctl's shared click parameter types: good values convert, bad ones fail naming the value."""
import click
import pytest
from click.testing import CliRunner

from controller.cli.params import DEVICE_ID, DURATION, FRACTION, KEY_VALUE, TAG, DeviceId, Fraction


def convert(ptype, value):
    return ptype.convert(value, None, None)


def fails(ptype, value, *words):
    with pytest.raises(click.BadParameter) as exc:
        convert(ptype, value)
    msg = str(exc.value)
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("text,seconds", [
    ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("500ms", 0.5), ("90", 90.0), ("1.5", 1.5), (" 2m ", 120.0),
    (45, 45.0), (0.25, 0.25),
])
def test_duration_good(text, seconds):
    assert convert(DURATION, text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5 minutes", "-3s", "1d", "m5", "1.2.3s"])
def test_duration_bad(text):
    fails(DURATION, text, repr(text), "duration")


def test_duration_negative_number():
    fails(DURATION, -1, "-1", "negative")


@pytest.mark.parametrize("text,frac", [("10%", 0.1), ("0.1", 0.1), ("0", 0.0), ("0%", 0.0), ("99.5%", 0.995),
                                       (" 25% ", 0.25), (0.5, 0.5)])
def test_fraction_good(text, frac):
    assert convert(FRACTION, text) == pytest.approx(frac)


@pytest.mark.parametrize("text,why", [("ten", "not a fraction"), ("%", "not a fraction"), ("100%", "below 100%"),
                                      ("1", "below 100%"), ("-5%", "at least 0"), ("1.5", "below 100%")])
def test_fraction_bad(text, why):
    fails(FRACTION, text, repr(text), why)


def test_fraction_inclusive_allows_one():
    assert convert(Fraction(inclusive=True), "100%") == 1.0
    fails(Fraction(inclusive=True), "101%", "'101%'", "at most 100%")


@pytest.mark.parametrize("text,pair", [
    ("mu=0.01", ("mu", 0.01)), ("n=3", ("n", 3)), ("on=true", ("on", True)), ("on=False", ("on", False)),
    ("name=krum", ("name", "krum")), ("x=", ("x", "")), ("expr=a=b", ("expr", "a=b")), ("v=null", ("v", None)),
    ("l=[1,2]", ("l", [1, 2])), (" k =1", ("k", 1)),
])
def test_key_value_good(text, pair):
    assert convert(KEY_VALUE, text) == pair


@pytest.mark.parametrize("text", ["mu", "=3", "", " =x"])
def test_key_value_bad(text):
    fails(KEY_VALUE, text, repr(text), "KEY=VALUE")


@pytest.mark.parametrize("text", ["pi-07", "a", "rack2.node_3:gpu", "A" * 64])
def test_device_id_good(text):
    assert convert(DEVICE_ID, text) == text


@pytest.mark.parametrize("text,why", [("pi/1", "'/'"), ("pi+", "'+'"), ("#", "'#'"), ("$SYS", "'$'"),
                                      ("", "empty"), ("-lead", "starting with"), ("A" * 65, "1-64"),
                                      ("tab\there", "control character")])
def test_device_id_bad(text, why):
    msg = fails(DEVICE_ID, text, why)
    assert "device id" in msg and (not text or repr(text) in msg)


def test_id_kinds_name_themselves():
    assert "tag 'a/b'" in fails(TAG, "a/b")
    assert "worker id 'w+'" in fails(DeviceId("worker id"), "w+")


def test_types_in_a_command_name_the_option():
    @click.command()
    @click.option("--deadline", type=DURATION, default="60s")
    @click.option("--canary", type=FRACTION, default="10%")
    @click.option("--param", type=KEY_VALUE, multiple=True)
    @click.argument("device", type=DEVICE_ID)
    def cmd(deadline, canary, param, device):
        click.echo(repr((deadline, canary, dict(param), device)))

    r = CliRunner()
    ok = r.invoke(cmd, ["pi-1", "--param", "mu=0.1", "--param", "on=true"])
    assert ok.exit_code == 0 and ok.output.strip() == repr((60.0, 0.1, {"mu": 0.1, "on": True}, "pi-1"))
    bad = r.invoke(cmd, ["pi-1", "--deadline", "soon"])
    assert bad.exit_code == 2 and "--deadline" in bad.output and "'soon'" in bad.output
    bad = r.invoke(cmd, ["pi/+"])
    assert bad.exit_code == 2 and "DEVICE" in bad.output and "contains" in bad.output
