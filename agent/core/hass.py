"""Home Assistant MQTT discovery: pure builders of (topic, payload) pairs.

Each device becomes an HA device with a handful of sensors read straight from the
telemetry topic with value templates; availability follows the retained state
topic, so HA greys the device out when the last will fires.
"""
from __future__ import annotations

import json
from typing import Any

from protocol.topics import Topics

# (object id, name, value template over the telemetry envelope, unit, device class, state class)
SENSORS: tuple[tuple[str, str, str, str | None, str | None], ...] = (
    ("cpu", "CPU", "{{ value_json.body.cpu_percent }}", "%", None),
    ("memory", "Memory used", "{{ value_json.body.mem_used_percent }}", "%", None),
    ("disk", "Disk used", "{{ value_json.body.disk.used_percent }}", "%", None),
    ("temperature", "Temperature", "{{ value_json.body.temperature_c }}", "°C", "temperature"),
    ("rss", "Agent memory", "{{ value_json.body.rss_mb }}", "MB", None),
    ("load", "Load (1 min)", "{{ value_json.body.load[0] }}", None, None),
    ("uptime", "Uptime", "{{ value_json.body.uptime_s }}", "s", "duration"),
    ("tx_bytes", "Data sent", "{{ value_json.body.bytes.tx_total }}", "B", "data_size"),
)


def node_id(device_id: str) -> str:
    """The discovery node-id level is the device id itself, so a broker ACL can confine a device
    to ``homeassistant/+/%u/+/config`` (Mosquitto substitutes %u only for a whole level). HA allows
    [a-zA-Z0-9_-] there; other characters are replaced (such ids cannot use the ACL pattern)."""
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in device_id)


def discovery_messages(topics: Topics, device_id: str, prefix: str, sw_version: str,
                       model: str = "edge-agent") -> list[tuple[str, bytes]]:
    nid = node_id(device_id)
    uid = f"edgefleet_{nid}"
    device: dict[str, Any] = {"identifiers": [uid], "name": device_id, "manufacturer": "edgefleet",
                              "model": model, "sw_version": sw_version}
    out: list[tuple[str, bytes]] = []
    for oid, name, tmpl, unit, dclass in SENSORS:
        cfg: dict[str, Any] = {
            "name": name,
            "unique_id": f"{uid}_{oid}",
            "object_id": f"{uid}_{oid}",
            "state_topic": topics.telemetry(device_id),
            "value_template": tmpl,
            "availability_topic": topics.state(device_id),
            "availability_template": "{{ value_json.body.status }}",
            "payload_available": "online",
            "payload_not_available": "offline",
            "state_class": "measurement" if dclass not in ("data_size",) else "total_increasing",
            "device": device,
        }
        if unit:
            cfg["unit_of_measurement"] = unit
        if dclass:
            cfg["device_class"] = dclass
        out.append((f"{prefix}/sensor/{nid}/{oid}/config", json.dumps(cfg, separators=(",", ":")).encode()))
    status = {
        "name": "Status", "unique_id": f"{uid}_status", "object_id": f"{uid}_status",
        "state_topic": topics.state(device_id), "value_template": "{{ value_json.body.status }}",
        "payload_on": "online", "payload_off": "offline", "device_class": "connectivity",
        "device": device,
    }
    out.append((f"{prefix}/binary_sensor/{nid}/status/config", json.dumps(status, separators=(",", ":")).encode()))
    # the model as an HA update entity: installed (from the device's state) vs latest (the
    # version the controller wants there, retained on ctl/desired/{id})
    update = {
        "name": "Model", "unique_id": f"{uid}_model", "object_id": f"{uid}_model",
        "state_topic": topics.state(device_id),
        "value_template": "{{ value_json.body.model.version if value_json.body.model is defined else None }}",
        "latest_version_topic": topics.desired(device_id),
        "latest_version_template": "{{ value_json.body.version }}",
        "title": "Model bundle", "entity_category": "diagnostic",
        "availability_topic": topics.state(device_id),
        "availability_template": "{{ value_json.body.status }}",
        "payload_available": "online", "payload_not_available": "offline",
        "device": device,
    }
    out.append((f"{prefix}/update/{nid}/model/config", json.dumps(update, separators=(",", ":")).encode()))
    return out


def birth_topic(prefix: str) -> str:
    """HA publishes 'online' here when it (re)starts; we re-announce on it."""
    return f"{prefix}/status"


def mcu_discovery_messages(topics: Topics, device_id: str, prefix: str, mcu_id: str,
                           firmware: str | None = None) -> list[tuple[str, bytes]]:
    """A sensor MCU behind this board's firmware bridge as its own HA device, ``via_device`` the
    board. Values come from the board's telemetry (``mcu.devices[<mcu id>]``); the discovery
    topics stay under the board's node id, so the per-device ACL pattern still covers them."""
    nid = node_id(device_id)
    mid = "".join(c if c.isalnum() or c in "_-" else "_" for c in mcu_id)
    uid = f"edgefleet_{nid}_mcu_{mid}"
    dev = {"identifiers": [uid], "name": f"{device_id} / {mcu_id}", "manufacturer": "edgefleet",
           "model": "sensor MCU", "via_device": f"edgefleet_{nid}"}
    if firmware:
        dev["sw_version"] = firmware
    base = f"value_json.body.mcu.devices[{json.dumps(mcu_id)}]"
    common = {"state_topic": topics.telemetry(device_id), "availability_topic": topics.state(device_id),
              "availability_template": "{{ value_json.body.status }}", "payload_available": "online",
              "payload_not_available": "offline", "device": dev}
    entities: list[tuple[str, str, dict[str, Any]]] = [
        ("binary_sensor", "online", {"name": "Online", "device_class": "connectivity",
                                     "value_template": f"{{{{ 'ON' if {base}.online else 'OFF' }}}}"}),
        ("sensor", "last_label", {"name": "Last result",
                                  "value_template": f"{{{{ {base}.last_result.label if {base}.last_result "
                                                    f"is defined else None }}}}"}),
        ("sensor", "results", {"name": "Results", "state_class": "total_increasing",
                               "value_template": f"{{{{ {base}.results }}}}"}),
        ("sensor", "uptime", {"name": "Uptime", "unit_of_measurement": "s", "device_class": "duration",
                              "value_template": f"{{{{ {base}.uptime_s if {base}.uptime_s is defined else None }}}}"}),
    ]
    out = []
    for component, oid, cfg in entities:
        full = {**common, **cfg, "unique_id": f"{uid}_{oid}", "object_id": f"{uid}_{oid}"}
        out.append((f"{prefix}/{component}/{nid}/mcu_{mid}_{oid}/config", json.dumps(full, separators=(",", ":")).encode()))
    return out
