"""What dashboards read off the broker: every human-facing payload matches its JSON Schema in
docs/schemas, carries its MQTT 5 content type, every HA template renders on the real messages,
every registered device has a desired version, and the last will is dated honestly."""
import json
import os
import signal
import time

import jsonschema
import pytest

from protocol.envelope import Envelope, encode
from tests.helpers.fleet import ROOT, start_fleet, stop
from tests.helpers.hass import render, templates
from tests.helpers.waiting import Probe, wait_for

SCHEMAS = ROOT / "docs" / "schemas"
BASE = "edgefleet/v1"


def schema(name):
    s = json.loads((SCHEMAS / name).read_text())
    jsonschema.Draft202012Validator.check_schema(s)
    return jsonschema.Draft202012Validator(s)


def test_every_schema_is_valid_and_documented():
    names = sorted(p.name for p in SCHEMAS.glob("*.schema.json"))
    assert {"state.schema.json", "telemetry.schema.json", "event.schema.json", "result.schema.json",
            "reply.schema.json", "ctl-state.schema.json", "desired.schema.json", "hass-discovery.schema.json"} <= set(names)
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for n in names:
        schema(n)
        assert f"schemas/{n}" in doc, f"docs/protocol.md does not link {n}"


def test_fleet_messages_match_schemas_content_types_and_ha_templates(tmp_path, mosquitto, example_bundle):
    probe = Probe(mosquitto.port, subscribe=(f"{BASE}/#", "homeassistant/#")).wait_subscribed()
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        add_agent("pi-d", extra=f'[model]\nbundle = "{example_bundle[0]}"\n')
        probe.wait(lambda t, p: t == f"{BASE}/dev/pi-d/telemetry" and b'"model"' in p, n=2, timeout=60,
                   what="telemetry with the model section")
        # a request and its reply
        req = Envelope(kind="infer.request", sender="dash", body={"x": [0.0] * 64},
                       reply_to=f"{BASE}/dev/pi-d/reply/dash")
        bad = Envelope(kind="infer.request", sender="dash", body={"x": [1.0, 2.0]}, reply_to=f"{BASE}/dev/pi-d/reply/dash")
        probe.publish(f"{BASE}/dev/pi-d/req", encode(req))
        probe.publish(f"{BASE}/dev/pi-d/req", encode(bad))
        probe.wait(lambda t, p: t == f"{BASE}/dev/pi-d/reply/dash", n=2, timeout=30, what="two replies")
        # every registered device gets a retained desired version, with no rollout ever made
        probe.wait(lambda t, p: t == f"{BASE}/ctl/desired/pi-d", timeout=30, what="ctl/desired/pi-d")
    finally:
        for p in procs:
            stop(p)
    probe.wait(lambda t, p: t == f"{BASE}/dev/pi-d/state" and b'"offline"' in p, timeout=30, what="offline state")
    probe.close()

    checks = {"/state": "state.schema.json", "/telemetry": "telemetry.schema.json", "/events": "event.schema.json",
              "/reply/dash": "reply.schema.json"}
    seen: dict[str, int] = {}
    last: dict[str, bytes] = {}
    for topic, payload, _ in probe.seen():
        if not payload:
            continue
        if topic.startswith("homeassistant/") and topic.endswith("/config"):
            schema("hass-discovery.schema.json").validate(json.loads(payload))
            seen["hass"] = seen.get("hass", 0) + 1
            continue
        name = next((s for suffix, s in checks.items() if topic.endswith(suffix) and "/dev/pi-d/" in topic), None)
        if topic == f"{BASE}/ctl/state":
            name = "ctl-state.schema.json"
        elif topic.startswith(f"{BASE}/ctl/desired/"):
            name = "desired.schema.json"
        if name is None:
            continue
        schema(name).validate(json.loads(payload))
        seen[name] = seen.get(name, 0) + 1
        last[topic] = payload
    assert set(seen) >= {*checks.values(), "ctl-state.schema.json", "desired.schema.json", "hass"}, seen
    assert json.loads(last[f"{BASE}/ctl/desired/pi-d"])["body"]["version"] == "1.0.0"
    replies = [json.loads(p)["body"] for t, p, _ in probe.seen(lambda t, p: t.endswith("/reply/dash"))]
    assert sorted(r["ok"] for r in replies) == [False, True]
    # MQTT 5 content types: JSON everywhere here (binary frames travel only on bin/req/reply/data)
    for topic in (f"{BASE}/dev/pi-d/telemetry", f"{BASE}/dev/pi-d/state", f"{BASE}/dev/pi-d/events",
                  f"{BASE}/dev/pi-d/reply/dash", f"{BASE}/ctl/desired/pi-d"):
        assert probe.content_types[topic] == {"application/json"}, (topic, probe.content_types[topic])
    # every HA template renders on the real messages without an undefined value
    tel = json.loads(last[f"{BASE}/dev/pi-d/telemetry"])
    rendered = {}
    for topic, payload, _ in probe.seen(lambda t, p: t.startswith("homeassistant/") and bool(p)):
        cfg = json.loads(payload)
        for key, src, tmpl in templates(cfg):
            on_src = [p for t, p, _ in probe.seen(lambda t, p: t == src)]
            msg = tel if src.endswith("/telemetry") else json.loads(
                next(p for p in on_src if b'"online"' in p) if src.endswith("/state") else on_src[-1])
            rendered[(cfg["unique_id"], key)] = render(tmpl, msg)
    assert rendered[("edgefleet_pi-d_latency_p99", "value_template")] != "None"
    assert float(rendered[("edgefleet_pi-d_inference_rate", "value_template")]) > 0
    assert json.loads(rendered[("edgefleet_pi-d_model", "value_template")]) == {"installed_version": "1.0.0",
                                                                               "in_progress": False}
    assert rendered[("edgefleet_pi-d_model", "latest_version_template")] == "1.0.0"


def test_last_will_says_so_and_is_dated_from_the_connection_it_guarded(tmp_path, mosquitto):
    probe = Probe(mosquitto.port, subscribe=(f"{BASE}/dev/pi-w/state",)).wait_subscribed()
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    agent = add_agent("pi-w")
    try:
        probe.wait(lambda t, p: b'"online"' in p, timeout=30, what="pi-w online")
        mosquitto.stop()
        restarted = time.time()
        mosquitto.start()
        # the agent reconnects (a state published after the restart)
        wait_for(lambda: any(b'"online"' in p and json.loads(p)["ts"] >= restarted for _, p, _ in probe.seen()),
                 timeout=60, what="pi-w online again after the broker restart")
        before = len(probe.seen())
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait()
        wait_for(lambda: any(b'"offline"' in p for _, p, _ in probe.seen()[before:]), timeout=30, what="the last will")
        will = json.loads(next(p for _, p, _ in probe.seen()[before:] if b'"offline"' in p))
    finally:
        for p in procs:
            stop(p)
        probe.close()
    assert will["body"]["status"] == "offline" and will["body"]["last_will"] is True
    assert will["ts"] >= restarted, "the will carries the time of a connection before the one it guarded"
