"""The MCU as a sub-device of a running agent: real Mosquitto, real pty, real model, real CLI."""
import asyncio
import json
import shutil
import subprocess
import sys

import pytest

from agent.core.config import ConfigError, parse_config
from agent.mcu.feature import McuBridge
from firmware_bridge.frames import MsgType
from firmware_bridge.simulator import Faults, MCUSimulator
from protocol.bundle import write_manifest
from protocol.envelope import Envelope, encode
from protocol.topics import Topics
from tests.helpers.serial import TFLITE, accuracy, running
from tests.helpers.waiting import Probe, until


@pytest.fixture
def mcu_bundle(tmp_path, example_bundle):
    """The example bundle plus the MCU's own model, listed in the manifest."""
    b = tmp_path / "bundle"
    shutil.copytree(example_bundle[0], b)
    shutil.copy(TFLITE, b / "mcu_digits.tflite")
    man = json.loads((b / "manifest.json").read_text())
    man["files"]["mcu_digits.tflite"] = {"role": "other"}
    write_manifest(b, man)
    return b


def bodies(probe, suffix):
    return [json.loads(p)["body"] for t, p, _ in probe.seen(lambda t, p: t.endswith(suffix))]


def test_bridge_section_defaults_and_bad_values_name_the_key():
    cfg = parse_config({"device": {"id": "pi"}})
    assert not cfg.bridge.enabled and cfg.bridge.baud == 115200 and cfg.bridge.policy == "drop_oldest"
    for table, msg in (({"enabled": True}, "bridge.port is required"),
                       ({"policy": "drop_all"}, "bridge.policy must be one of"),
                       ({"baud": 0}, "bridge.baud must be 300..12000000"),
                       ({"queue_size": 0}, "bridge.queue_size"),
                       ({"baud": "fast"}, "bridge.baud must be an integer"),
                       ({"prot": "/dev/ttyUSB0"}, "did you mean 'port'")):
        with pytest.raises(ConfigError, match=msg):
            parse_config({"device": {"id": "pi"}, "bridge": table})


def test_agent_serves_the_mcu_reports_it_and_pushes_a_bundle_file(tmp_path, mosquitto, mcu_bundle, digits_test, pty):
    from agent.app import Agent

    x, y = digits_test
    p = pty()
    sim = MCUSimulator(p.master, "mcu-9", x[:50], rate_hz=100, heartbeat_s=0.2,
                       faults=Faults(bitflip=0.05, rx_bitflip=0.05, seed=2)).start()
    cfg = parse_config({"device": {"id": "pi-mcu"}, "mqtt": {"broker": mosquitto.url},
                        "state": {"dir": str(tmp_path / "state")}, "telemetry": {"interval_s": 0.3},
                        "homeassistant": {"enabled": False}, "model": {"bundle": str(mcu_bundle)},
                        "inference": {"results": "every", "max_results_per_s": 100},
                        "bridge": {"enabled": True, "port": p.name, "push_ack_timeout_s": 0.1, "push_retries": 8,
                                   "offline_after_s": 1.0}})
    probe = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/pi-mcu/#",))
    cmd_topic = Topics(cfg.mqtt.topic_root).cmd("pi-mcu")

    def command(name, **args):
        probe.publish(cmd_topic, encode(Envelope(kind="cmd", sender="ops", body={"command": name, "args": args})))

    def events(name):
        return [b for b in bodies(probe, "/events") if b["event"] == name]

    async def main():
        async with running(Agent(cfg)) as agent:
            await until(lambda: len(sim.state.replies) >= 50, what="INFER_REPLYs through the agent")
            sim.send(MsgType.LOG, {"level": 2, "text": "flash almost full"})
            sim.send(MsgType.LOG, {"level": 0, "text": "debug chatter"})
            sim.send(MsgType.RESULT, {"timestamp_ms": 5, "label": 3, "confidence": 0.75})
            sim.send(MsgType.SENSOR_FRAME, {"timestamp_ms": 6, "samples": [1.0, 2.0, 3.0]})   # not the model's input
            command("mcu.push", file="nope.bin")
            command("mcu.push", file="mcu_digits.tflite")
            await until(lambda: events("mcu.model.pushed") or events("mcu.model.failed"), timeout=20,
                        what="the push's final event")
            await until(lambda: [b for b in bodies(probe, "/telemetry")
                                 if b.get("mcu", {}).get("devices", {}).get("mcu-9", {}).get("results")],
                        what="MCU telemetry with its RESULT")
            sim.stop()                                          # the MCU goes quiet
            await until(lambda: events("mcu.offline"), timeout=5, what="mcu.offline")
        return agent

    try:
        agent = asyncio.run(main())
    finally:
        sim.stop()
        probe.close()
    pushed = events("mcu.model.pushed")
    assert pushed, events("mcu.model.failed")
    assert pushed[0]["mcu"] == "mcu-9" and pushed[0]["bytes"] == TFLITE.stat().st_size and pushed[0]["retransmits"] >= 0
    assert sim.state.model == TFLITE.read_bytes()
    replies = bodies(probe, "/reply")
    bad = [r for r in replies if r.get("command") == "mcu.push" and not r["ok"]]
    assert bad and "nope.bin" in bad[0]["error"] and "mcu_digits.tflite" in bad[0]["error"]
    assert any(r.get("ok") and r["result"].get("started") for r in replies if r.get("command") == "mcu.push")
    # events: the HELLO, the warning log (not the debug one), the on-MCU result
    hello = events("mcu.hello")
    assert hello and hello[0]["mcu"] == "mcu-9" and hello[0]["sensors"] == ["digits8x8"]
    assert [(e["level"], e["text"]) for e in events("mcu.log")] == [("warning", "flash almost full")]
    assert events("mcu.result")[0]["label"] == 3
    assert "shape" in events("mcu.bad_input")[0]["reason"] and agent.feature(McuBridge).counts["bad_input"] == 1
    # telemetry: the MCU as a sub-device, and its frames counted by the agent's model
    tel = [b for b in bodies(probe, "/telemetry")
           if b.get("mcu", {}).get("devices", {}).get("mcu-9", {}).get("results")]
    dev = tel[-1]["mcu"]["devices"]["mcu-9"]
    assert dev["online"] and dev["firmware"] == "sim-1.0" and dev["uptime_s"] >= 0
    assert dev["logs"] == {"warning": 1, "debug": 1} and dev["results"] == 1
    # Results counts the MCU's own result and the board's answers to its frames; the last is either
    assert dev["results_total"] == dev["results"] + dev["answered"] and dev["answered"] >= 50
    assert dev["last_result"]["source"] in ("mcu", "board")
    assert tel[-1]["mcu"]["answered"] >= 50 and tel[-1]["model"]["inferences"] >= 50
    assert sum(tel[-1]["mcu"]["link"]["dropped"].values()) >= 1     # the line was noisy, and it was counted
    # every MCU sample went through the agent's serving loop and its results channel
    results = [b for b in bodies(probe, "/results") if str(b.get("id", "")).startswith("mcu-9:")]
    assert len(results) >= 20
    assert accuracy(sim.state.replies, y) >= 0.9
    assert agent.feature(McuBridge).counts["reply_timeouts"] == 0


def test_edge_agent_bridge_command_answers_frames_and_pushes(tmp_path, pty, example_bundle, digits_test):
    x, y = digits_test
    p = pty()
    sim = MCUSimulator(p.master, "mcu-cli", x[:50], rate_hz=100).start()
    try:
        run = subprocess.run([sys.executable, "-m", "agent.cli", "bridge", "--port", p.name, "--bundle",
                              str(example_bundle[0]), "--seconds", "1.5"], capture_output=True, text=True, timeout=60)
        push = subprocess.run([sys.executable, "-m", "agent.cli", "bridge", "--port", p.name, "--push", str(TFLITE)],
                              capture_output=True, text=True, timeout=60)
    finally:
        sim.stop()
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert any(e["event"] == "mcu.hello" and e["device_id"] == "mcu-cli" for e in lines)
    assert lines[-1]["event"] == "bridge.stats" and lines[-1]["replies"] >= 50
    assert accuracy(sim.state.replies, y) >= 0.95
    assert push.returncode == 0, push.stdout + push.stderr
    outcome = [e for e in map(json.loads, push.stdout.splitlines()) if e["event"].startswith("mcu.model.")]
    assert [e["event"] for e in outcome] == ["mcu.model.pushed"] and outcome[0]["size"] == TFLITE.stat().st_size
    assert sim.state.model == TFLITE.read_bytes()


def test_ha_discovery_of_an_mcu_is_cleared_when_the_agent_restarts_without_its_bridge(tmp_path, mosquitto,
                                                                                     example_bundle, digits_test, pty):
    """Stale discovery floods HA with template errors: what the agent no longer offers is removed."""
    from agent.app import Agent
    from tests.helpers.hass import render, templates

    x, _ = digits_test
    p = pty()
    sim = MCUSimulator(p.master, "mcu-h", x[:20], rate_hz=50, heartbeat_s=0.2).start()
    base = {"device": {"id": "pi-h", "location": "Barn"}, "mqtt": {"broker": mosquitto.url},
            "state": {"dir": str(tmp_path / "state")}, "telemetry": {"interval_s": 0.3},
            "model": {"bundle": str(example_bundle[0])}}
    with_bridge = parse_config({**base, "bridge": {"enabled": True, "port": p.name}})
    ha = Probe(mosquitto.port, subscribe=("homeassistant/#", "edgefleet/v1/dev/pi-h/telemetry")).wait_subscribed()
    mcu_cfg = lambda t, pl: "/mcu_mcu-h_" in t and bool(pl)  # noqa: E731

    async def run(cfg, until_pred, what):
        async with running(Agent(cfg)):
            await until(until_pred, timeout=30, what=what)

    try:
        asyncio.run(run(with_bridge, lambda: ha.seen(mcu_cfg) and [
            1 for t, pl, _ in ha.seen(lambda t, pl: t.endswith("/telemetry") and b'"mcu-h"' in pl)],
            "MCU discovery and telemetry"))
        # the announced MCU entities render on the board's real telemetry, availability included
        tel = json.loads(ha.seen(lambda t, pl: t.endswith("/telemetry") and b'"mcu-h"' in pl)[-1][1])
        announced = {t: json.loads(pl) for t, pl, _ in ha.seen(mcu_cfg)}
        assert {c["device"]["suggested_area"] for c in announced.values()} == {"Barn"}
        for cfg in announced.values():
            for key, src, tmpl in templates(cfg):
                if src.endswith("/telemetry"):
                    assert render(tmpl, tel) not in ("None",) or "unit_of_measurement" in cfg or cfg.get("state_class")
        sim.stop()
        n = len(ha.seen())
        asyncio.run(run(parse_config(base), lambda: any(mcu_cfg(t, b"x") and not pl for t, pl, _ in ha.seen()[n:])
                        and len([1 for t, pl, _ in ha.seen()[n:] if mcu_cfg(t, b"x") and not pl]) == len(announced),
                        "empty retained configs for every MCU entity"))
    finally:
        sim.stop()
        ha.close()
    # a Home Assistant that connects now finds the board's entities and none of the MCU's
    fresh = Probe(mosquitto.port, subscribe=("homeassistant/+/pi-h/+/config",)).wait_subscribed()
    try:
        fresh.wait(lambda t, pl: t.endswith("/cpu/config"), timeout=10, what="the board's retained config")
        assert not fresh.seen(mcu_cfg)
    finally:
        fresh.close()
