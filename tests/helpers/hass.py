"""Render Home Assistant MQTT value templates the way HA does (Jinja2, ``value_json`` = the parsed
payload), but stricter: any use of an undefined value raises (HA logs an ERROR for it on every
message), so a template that passes here is quiet in HA."""
from __future__ import annotations

import json
from typing import Any

import jinja2

_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)


def render(template: str, payload: bytes | str | dict[str, Any]) -> str:
    value = payload if isinstance(payload, (bytes, str)) else json.dumps(payload)
    text = value.decode() if isinstance(value, bytes) else value
    try:
        value_json = json.loads(text)
    except ValueError:
        value_json = None
    return _ENV.from_string(template).render(value=text, value_json=value_json).strip()


def templates(config: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(key, topic, template) of every template in one discovery config."""
    out = []
    if "value_template" in config:
        out.append(("value_template", config["state_topic"], config["value_template"]))
    if "latest_version_template" in config:
        out.append(("latest_version_template", config["latest_version_topic"], config["latest_version_template"]))
    for a in config.get("availability", []):
        if "value_template" in a:
            out.append(("availability", a["topic"], a["value_template"]))
    return out
