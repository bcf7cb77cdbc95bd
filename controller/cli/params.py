"""Click parameter types shared by every ``fleetctl`` command group.

Each type converts once, at parse time, and fails with click's usual "Invalid value for
'--opt'" message naming the value, so commands receive typed values (seconds, a fraction, a
parsed ``(key, value)``, a valid id) and never re-parse strings themselves.
"""
from __future__ import annotations

import json
import re
from typing import Any, Callable

import click

from protocol.topics import InvalidId, validate_id

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class Duration(click.ParamType):
    """``30s``, ``500ms``, ``5m``, ``1h`` or plain seconds (``90``, ``1.5``) → float seconds.

    ``positive=True`` refuses zero: a timeout or deadline of 0 s would give up before anything ran."""

    name = "duration"

    def __init__(self, positive: bool = False) -> None:
        self.positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if value < 0:
                self.fail(f"{value!r} is negative", param, ctx)
            seconds = float(value)
        else:
            m = _DURATION_RE.fullmatch(str(value))
            if not m:
                self.fail(f"{value!r} is not a duration like 60s, 500ms, 2m or 1h", param, ctx)
            seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
        if self.positive and seconds <= 0:
            self.fail(f"{value!r} must be longer than 0 s", param, ctx)
        return seconds


class Fraction(click.ParamType):
    """``10%`` or ``0.1`` → 0.1; at least 0 and below 1 (``inclusive=True`` also allows 1)."""

    name = "fraction"

    def __init__(self, inclusive: bool = False) -> None:
        self.inclusive = inclusive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            f = value
        else:
            v = str(value).strip()
            try:
                f = float(v[:-1]) / 100 if v.endswith("%") else float(v)
            except ValueError:
                self.fail(f"{value!r} is not a fraction like 10% or 0.1", param, ctx)
        if not (0 <= f < 1 or (self.inclusive and f == 1)):
            self.fail(f"{value!r} must be at least 0 and {'at most' if self.inclusive else 'below'} 100%",
                      param, ctx)
        return f


def parse_value(text: str) -> Any:
    """A number, bool, null, list or object when ``text`` is one (JSON; ``True``/``False`` too), else the text."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return json.loads(text)
    except ValueError:
        return text


class KeyValue(click.ParamType):
    """``key=value`` → ``(key, parsed value)``; use with ``multiple=True`` and ``dict(...)``."""

    name = "key=value"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, Any]:
        if isinstance(value, tuple):
            return value
        k, sep, v = str(value).partition("=")
        if not sep or not k.strip():
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        return k.strip(), parse_value(v)


def checked_settings(what: str, check: Callable[[dict[str, Any]], Any]) -> Callable[..., dict[str, Any]]:
    """A click callback for a ``multiple=True`` KEY_VALUE option: the pairs as a dict, checked now by
    ``check`` (the validator the consumer itself runs later), so a bad key or value fails at parse
    time, naming the flag and the value, before anything is created."""

    def callback(ctx: click.Context, param: click.Parameter, value: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
        d = dict(value)
        if d:
            try:
                check(d)
            except (TypeError, ValueError) as exc:
                given = " ".join(f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in value)
                raise click.BadParameter(f"{given}: {exc}", ctx, param) from None
        return d

    callback.__doc__ = f"Check {what} settings at parse time."
    return callback


class DeviceId(click.ParamType):
    """An id that is a safe topic level, checked exactly as ``protocol.topics`` checks it."""

    name = "device_id"

    def __init__(self, what: str = "device id") -> None:
        self.what = what

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return validate_id(value, self.what)
        except InvalidId as exc:
            self.fail(str(exc), param, ctx)


class BrokerUrl(click.ParamType):
    """``mqtt://host:port`` or ``mqtts://…``, checked as the config checks ``mqtt.broker``."""

    name = "url"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from protocol.mqttconf import BrokerUrlError, parse_broker_url

        try:
            parse_broker_url(value)
        except BrokerUrlError as exc:
            self.fail(f"mqtt.broker: {exc}", param, ctx)   # the config key it overrides
        return value


BROKER_URL = BrokerUrl()
BROKER_HELP = "broker URL, mqtt://host:port (overrides config)"
DURATION = Duration()
POSITIVE_DURATION = Duration(positive=True)
FRACTION = Fraction()
KEY_VALUE = KeyValue()
DEVICE_ID = DeviceId()
TAG = DeviceId("tag")
