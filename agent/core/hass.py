"""Home Assistant MQTT discovery: pure builders of (topic, payload) pairs, and their lifecycle.

Each device becomes an HA device with sensors read straight from the telemetry topic with
value templates; availability follows the retained state topic, so HA greys the device out
when the last will fires. Sensor MCUs behind the board are their own HA devices
(``via_device`` the board) and are available only while both the board and the MCU are.

Templates never fail: every path is guarded (``is defined`` at each level), a numeric sensor
renders ``None`` (HA: unknown) and a text sensor renders nothing (HA ignores an empty render)
when the value is missing or null. HA logs an error for every message a failing template sees.

Lifecycle: what the agent announced is recorded (``Announced``); what it no longer offers (an
MCU bridge removed from the config, a sensor dropped by an upgrade) is cleared with an empty
retained config, which is how HA removes an entity.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from protocol.atomicfile import write_atomic
from protocol.topics import Topics

NUMERIC, TEXT = "numeric", "text"


def _path_expr(path: str) -> tuple[str, str]:
    """(expression, guard) for a dotted path under ``value_json``; ``[…]`` parts pass through."""
    parts = _split(path)
    expr, guards = "value_json", []
    for p in parts:
        # subscripts, never attributes: ``b.update`` would be the dict's method, not the key
        expr = f"{expr}[{p[1:-1]}]" if p.startswith("[") else f"{expr}[{json.dumps(p)}]"
        guards.append(f"{expr} is defined")
    guards.append(f"{expr} is not none")
    return expr, " and ".join(guards)


def _split(path: str) -> list[str]:
    out, cur, i = [], "", 0
    while i < len(path):
        c = path[i]
        if c == ".":
            if cur:
                out.append(cur)
            cur = ""
        elif c == "[":
            if cur:
                out.append(cur)
            j = path.index("]", i)
            out.append(path[i:j + 1])
            cur, i = "", j
        else:
            cur += c
        i += 1
    if cur:
        out.append(cur)
    return out


def template(path: str, kind: str = NUMERIC, expr: str | None = None) -> str:
    """A value template that renders ``path`` (or ``expr`` over it), and a safe empty value when
    any level is missing or null."""
    value, guard = _path_expr(path)
    shown = expr.replace("{v}", value) if expr else value
    empty = "None" if kind == NUMERIC else "''"
    return f"{{{{ ({shown}) if {guard} else {empty} }}}}"


# (object id, name, telemetry path, unit, device class, state class, entity category)
SENSORS: tuple[tuple[str, str, str, str | None, str | None, str, str | None], ...] = (
    ("cpu", "CPU", "body.cpu_percent", "%", None, "measurement", None),
    ("memory", "Memory used", "body.mem_used_percent", "%", None, "measurement", None),
    ("disk", "Disk used", "body.disk.used_percent", "%", None, "measurement", None),
    ("temperature", "Temperature", "body.temperature_c", "°C", "temperature", "measurement", None),
    ("rss", "Agent memory", "body.rss_mb", "MB", "data_size", "measurement", "diagnostic"),
    ("load", "Load (1 min)", "body.load[0]", None, None, "measurement", "diagnostic"),
    ("uptime", "Uptime", "body.uptime_s", "s", "duration", "measurement", "diagnostic"),
    ("tx_bytes", "Data sent", "body.bytes.tx_total", "B", "data_size", "total_increasing", "diagnostic"),
    # the model: what the board is for
    ("inference_rate", "Inferences per second", "body.model.throughput_per_s", "1/s", None, "measurement", None),
    ("latency_p99", "Inference latency p99", "body.model.latency_ms.p99_ms", "ms", "duration", "measurement", None),
    ("confidence", "Mean confidence", "body.model.mean_confidence", None, None, "measurement", None),
    ("accuracy", "Accuracy (labelled hold-out)", "body.learning.holdout_accuracy", None, None, "measurement", None),
    ("drift", "Drift score", "body.learning.drift.score", None, None, "measurement", None),
    ("offload_rate", "Offload rate", "body.offload.offload_rate", None, None, "measurement", None),
)


def node_id(device_id: str) -> str:
    """The discovery node-id level is the device id itself, so a broker ACL can confine a device
    to ``homeassistant/+/%u/+/config`` (Mosquitto substitutes %u only for a whole level). HA allows
    [a-zA-Z0-9_-] there; other characters are replaced (such ids cannot use the ACL pattern)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in device_id)


def _board_availability(topics: Topics, device_id: str) -> dict[str, Any]:
    return {"topic": topics.state(device_id), "value_template": template("body.status", TEXT),
            "payload_available": "online", "payload_not_available": "offline"}


def _dump(cfg: dict[str, Any]) -> bytes:
    return json.dumps(cfg, separators=(",", ":"), ensure_ascii=False).encode()


def discovery_messages(topics: Topics, device_id: str, prefix: str, sw_version: str,
                       model: str = "edge-agent", area: str = "") -> list[tuple[str, bytes]]:
    nid = node_id(device_id)
    uid = f"edgefleet_{nid}"
    device: dict[str, Any] = {"identifiers": [uid], "name": device_id, "manufacturer": "edgefleet",
                              "model": model, "sw_version": sw_version}
    if area:
        device["suggested_area"] = area
    avail = {"availability": [_board_availability(topics, device_id)]}
    out: list[tuple[str, bytes]] = []
    for oid, name, path, unit, dclass, sclass, category in SENSORS:
        cfg: dict[str, Any] = {
            "name": name, "unique_id": f"{uid}_{oid}", "object_id": f"{uid}_{oid}",
            "state_topic": topics.telemetry(device_id), "value_template": template(path),
            "state_class": sclass, "device": device, **avail,
        }
        if unit:
            cfg["unit_of_measurement"] = unit
        if dclass:
            cfg["device_class"] = dclass
        if category:
            cfg["entity_category"] = category
        out.append((f"{prefix}/sensor/{nid}/{oid}/config", _dump(cfg)))
    status = {
        "name": "Status", "unique_id": f"{uid}_status", "object_id": f"{uid}_status",
        "state_topic": topics.state(device_id), "value_template": template("body.status", TEXT),
        "payload_on": "online", "payload_off": "offline", "device_class": "connectivity",
        "device": device,
    }
    out.append((f"{prefix}/binary_sensor/{nid}/status/config", _dump(status)))
    # the model as an HA update entity. The state topic's template renders HA's JSON form
    # (installed_version + in_progress while an update is being fetched or checked); latest is
    # the version the controller wants there, retained on ctl/desired/{id} for every registered
    # device (controller/service.py), so the entity is never "unknown" before a first rollout.
    installed = ("{% set b = value_json['body'] if value_json['body'] is defined else {} %}"
                 "{% set m = b['model'] if b['model'] is defined and b['model'] else {} %}"
                 "{% set u = b['update'] if b['update'] is defined and b['update'] else {} %}"
                 "{{ {'installed_version': m['version'] if m['version'] is defined else None,"
                 " 'in_progress': u['state'] is defined} | tojson }}")
    update = {
        "name": "Model", "unique_id": f"{uid}_model", "object_id": f"{uid}_model",
        "state_topic": topics.state(device_id), "value_template": installed,
        "latest_version_topic": topics.desired(device_id),
        "latest_version_template": template("body.version", TEXT),
        "title": "Model bundle", "entity_category": "diagnostic", "device": device, **avail,
    }
    out.append((f"{prefix}/update/{nid}/model/config", _dump(update)))
    return out


def birth_topic(prefix: str) -> str:
    """HA publishes 'online' here when it (re)starts; we re-announce on it."""
    return f"{prefix}/status"


def mcu_node(mcu_id: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in mcu_id)


def mcu_discovery_messages(topics: Topics, device_id: str, prefix: str, mcu_id: str,
                           firmware: str | None = None, area: str = "") -> list[tuple[str, bytes]]:
    """A sensor MCU behind this board's firmware bridge as its own HA device, ``via_device`` the
    board. Values come from the board's telemetry (``mcu.devices[<mcu id>]``); the discovery
    topics stay under the board's node id, so the per-device ACL pattern still covers them.
    Available only while the board is online AND the MCU is (availability_mode all)."""
    nid = node_id(device_id)
    mid = mcu_node(mcu_id)
    uid = f"edgefleet_{nid}_mcu_{mid}"
    dev: dict[str, Any] = {"identifiers": [uid], "name": f"{device_id} / {mcu_id}", "manufacturer": "edgefleet",
                           "model": "sensor MCU", "via_device": f"edgefleet_{nid}"}
    if firmware:
        dev["sw_version"] = firmware
    if area:
        dev["suggested_area"] = area
    base = f"body.mcu.devices[{json.dumps(mcu_id)}]"
    mcu_online = {"topic": topics.telemetry(device_id),
                  "value_template": template(f"{base}.online", TEXT, "'online' if {v} else 'offline'"),
                  "payload_available": "online", "payload_not_available": "offline"}
    common = {"state_topic": topics.telemetry(device_id), "device": dev,
              "availability": [_board_availability(topics, device_id), mcu_online], "availability_mode": "all"}
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("binary_sensor", "online", {"name": "Online", "device_class": "connectivity",
                                     "availability": [_board_availability(topics, device_id)],
                                     "availability_mode": "latest",
                                     "value_template": template(f"{base}.online", TEXT, "'ON' if {v} else 'OFF'")}),
        ("sensor", "last_label", {"name": "Last result",
                                  "value_template": template(f"{base}.last_result.label", TEXT)}),
        ("sensor", "last_confidence", {"name": "Last result confidence", "state_class": "measurement",
                                       "value_template": template(f"{base}.last_result.confidence")}),
        # every result for this MCU: the MCU's own (on-MCU model) and the board's on its frames
        ("sensor", "results", {"name": "Results", "state_class": "total_increasing",
                               "value_template": template(f"{base}.results_total")}),
        ("sensor", "uptime", {"name": "Uptime", "unit_of_measurement": "s", "device_class": "duration",
                              "state_class": "measurement", "entity_category": "diagnostic",
                              "value_template": template(f"{base}.uptime_s")}),
    ]
    out = []
    for component, oid, cfg in entities:
        full = {**common, **cfg, "unique_id": f"{uid}_{oid}", "object_id": f"{uid}_{oid}"}
        out.append((f"{prefix}/{component}/{nid}/mcu_{mid}_{oid}/config", _dump(full)))
    return out


# -- lifecycle ------------------------------------------------------------------------
def stale(previous: Iterable[str], current: Iterable[str]) -> list[str]:
    """The discovery topics announced before and not offered now: clear each (empty retained)."""
    now = set(current)
    return sorted(t for t in set(previous) if t not in now)


class Announced:
    """The discovery topics this agent has announced, kept in its state dir (written atomically), so
    a restart with less to offer (no MCU bridge, fewer sensors) removes what is gone from HA."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.topics: set[str] = set()
        try:
            data = json.loads(path.read_text())
            if isinstance(data, list):
                self.topics = {t for t in data if isinstance(t, str)}
        except (OSError, ValueError):
            pass  # none recorded (first start) or unreadable: nothing known to clear

    def replace(self, topics: Iterable[str]) -> list[str]:
        """Record ``topics`` as everything announced now; returns the stale ones to clear."""
        new = set(topics)
        gone = stale(self.topics, new)
        if new != self.topics:
            self.topics = new
            self._save()
        return gone

    def add(self, topics: Iterable[str]) -> None:
        new = self.topics | set(topics)
        if new != self.topics:
            self.topics = new
            self._save()

    def _save(self) -> None:
        try:
            write_atomic(self.path, json.dumps(sorted(self.topics)))
        except OSError:
            pass  # the state dir is unwritable: the agent reports that elsewhere; HA still works
