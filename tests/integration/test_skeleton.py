"""The walking skeleton end to end: real Mosquitto, real agent and controller processes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from controller.registry import Registry
from protocol.envelope import Envelope, encode
from tests.helpers.bundles import cached_example, copy_into
from tests.helpers.fleet import ENV, ROOT, agent_config, device, fleetctl, start_fleet, stop
from tests.helpers.waiting import Probe, wait_for


@pytest.fixture
def fleet(tmp_path, mosquitto):
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    yield db, add_agent
    for p in procs:
        stop(p)


@pytest.fixture(params=["mosquitto", "amqtt"])
def any_fleet(request, tmp_path):
    """The smoke tests run on both brokers: Mosquitto (v5) and the embedded amqtt (3.1.1 only)."""
    if request.param == "mosquitto":
        url = request.getfixturevalue("mosquitto").url
        embedded = None
    else:
        from controller.broker import EmbeddedBroker

        embedded = EmbeddedBroker().start()
        url = embedded.url
    db, add_agent, procs = start_fleet(tmp_path, url)
    yield db, add_agent, url
    for p in procs:
        stop(p)
    if embedded:
        embedded.stop()


def test_device_appears_telemetry_lands_and_sigterm_goes_offline(any_fleet, tmp_path):
    db, add_agent, url = any_fleet
    agent = add_agent("pi-1")
    d = wait_for(lambda: (x := device(db, "pi-1")) and x.online and x.telemetry and x, what="pi-1 online")
    assert d.state["capabilities"]["cores"] >= 1
    assert "rss_mb" in d.telemetry and "bytes" in d.telemetry
    wait_for(lambda: Registry(db, readonly=True).telemetry_count("pi-1") >= 3, what="3 telemetry rows")

    out = fleetctl("--db", str(db), "devices", "--json")
    assert out.returncode == 0, out.stderr
    devs = json.loads(out.stdout)["devices"]
    assert [(x["id"], x["online"]) for x in devs] == [("pi-1", True)]
    human = fleetctl("--db", str(db), "devices")
    assert "pi-1" in human.stdout and "ONLINE" in human.stdout
    show = fleetctl("--db", str(db), "device", "show", "pi-1", "--json")
    assert json.loads(show.stdout)["id"] == "pi-1"

    ping = fleetctl("--broker", url, "cmd", "pi-1", "ping", "--json")
    assert ping.returncode == 0, ping.stderr
    assert json.loads(ping.stdout)["result"]["pong"] is True

    t0 = time.monotonic()
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(5) == 0
    assert time.monotonic() - t0 < 2.0, "agent must exit within 2 s of SIGTERM"
    wait_for(lambda: device(db, "pi-1").online is False, what="pi-1 offline after SIGTERM")


def test_kill9_goes_offline_via_last_will(any_fleet, tmp_path):
    db, add_agent, _ = any_fleet
    agent = add_agent("pi-9")
    wait_for(lambda: (x := device(db, "pi-9")) and x.online, what="pi-9 online")
    probe_state = device(db, "pi-9").status_changed
    agent.kill()
    agent.wait()
    d = wait_for(lambda: (x := device(db, "pi-9")) and not x.online and x, timeout=60, what="last will")
    assert d.status_changed > probe_state


def test_bad_input_is_counted_and_survived(fleet, mosquitto, tmp_path):
    db, add_agent = fleet
    add_agent("pi-2")
    wait_for(lambda: (x := device(db, "pi-2")) and x.online, what="pi-2 online")
    probe = Probe(mosquitto.port)
    cmd = "edgefleet/v1/dev/pi-2/cmd"
    bad = [
        b"not json at all",
        json.dumps({"schema": 99, "kind": "cmd", "id": "x", "sender": "c", "ts": 1, "body": {}}).encode(),
        json.dumps({"schema": 1, "kind": "weird", "id": "x", "sender": "c", "ts": 1, "body": {}}).encode(),
        b"{" * 300_000,
    ]
    for payload in bad:
        probe.publish(cmd, payload)
    # a device may not speak for another, and garbage telemetry must not reach the registry
    probe.publish("edgefleet/v1/dev/pi-2/telemetry",
                  encode(Envelope(kind="telemetry", sender="pi-3", body={"seq": 1, "interval_s": 1})))
    probe.publish("edgefleet/v1/dev/pi-2/telemetry", b"\x00\xff garbage")
    probe.close()

    ping = fleetctl("--broker", mosquitto.url, "cmd", "pi-2", "ping")
    assert ping.returncode == 0, ping.stderr

    def agent_rejects():
        rows = Registry(db, readonly=True).telemetry("pi-2", limit=1)
        return rows and rows[-1]["body"]["msgs"]["rejected"]

    rej = wait_for(lambda: (r := agent_rejects()) and sum(r.values()) >= 4 and r, what="agent reject counters")
    assert rej.get("bad_json") == 1 and rej.get("schema") == 1 and rej.get("unknown_kind") == 1
    assert rej.get("oversize") == 1
    reg = Registry(db, readonly=True)
    assert reg.rejects() == {"sender_mismatch": 1, "bad_json": 1}
    assert device(db, "pi-2").online
    unknown = fleetctl("--broker", mosquitto.url, "cmd", "pi-2", "no-such-command")
    assert unknown.returncode == 1 and "unknown command" in unknown.stdout


def test_home_assistant_discovery_and_reannounce(fleet, mosquitto):
    db, add_agent = fleet
    probe = Probe(mosquitto.port, subscribe=("homeassistant/#",))
    add_agent("pi-4")
    configs = lambda: probe.seen(lambda t, p: t.startswith("homeassistant/") and t.endswith("/config"))
    first = wait_for(lambda: len(configs()) >= 9 and configs(), what="discovery configs")
    cpu = json.loads(next(p for t, p, _ in first if t.endswith("/cpu/config")))
    assert cpu["state_topic"] == "edgefleet/v1/dev/pi-4/telemetry"
    assert [a["topic"] for a in cpu["availability"]] == ["edgefleet/v1/dev/pi-4/state"]
    n = len(configs())
    probe.publish("homeassistant/status", b"online")
    wait_for(lambda: len(configs()) >= 2 * n, what="re-announce on HA birth")
    probe.close()
    late = Probe(mosquitto.port, subscribe=("homeassistant/#",))
    wait_for(lambda: any(r for _, _, r in late.seen()), what="retained discovery for a late subscriber")
    late.close()


def test_agent_reconnects_after_broker_restart(fleet, mosquitto):
    db, add_agent = fleet
    add_agent("pi-5")
    wait_for(lambda: (x := device(db, "pi-5")) and x.online, what="pi-5 online")
    mosquitto.stop()
    time.sleep(1.0)
    mosquitto.start()
    # samples taken during the outage arrive first (from the outbox, connects == 1), then new ones
    wait_for(lambda: any(r["body"]["link"]["connects"] >= 2 for r in Registry(db, readonly=True)
                         .telemetry("pi-5", limit=50)), timeout=30, what="telemetry after reconnect")


def test_demo_on_the_embedded_broker(tmp_path):
    # the demo builds its example bundle into $XDG_CACHE_HOME/edgefleet unless it is there: hand it
    # the one from the tests' build cache (the demo's parameters: build_example(out, "small"))
    copy_into(cached_example("small")[0], tmp_path / "xdg" / "edgefleet" / "example-digits-1.0.0")
    out = fleetctl("demo", "--agents", "2", "--duration", "14", "--interval", "0.5", "--rollout-at", "3", "--json",
                   timeout=120, env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout)
    assert summary["embedded_broker"] is True
    assert [d["id"] for d in summary["devices"]] == ["demo-01", "demo-02"]
    assert all(d["online"] and d["last_telemetry"]["seq"] >= 2 for d in summary["devices"])
    assert summary["clean_shutdown"] is True
    assert summary["rejects"] == {}
    assert all(isinstance(v, float) for v in summary["signed_ping_ms"].values()), summary["signed_ping_ms"]
    assert set(summary["signed_ping_ms"]) == {"demo-01", "demo-02"}
    # real inference with real accuracy on every agent
    assert all(d["model"] == "digits@1.0.1" and d["last_telemetry"]["model"]["inferences"] > 0
               for d in summary["devices"])
    # the demo's rollout: a head-only signed patch, canary first, on the embedded (3.1.1) broker
    assert summary["rollout"]["status"] == "done" and summary["rollout"]["applied"] == 2, summary["rollout"]
    assert all(r["accuracy"] >= 0.9 for r in summary["results"].values()) and len(summary["results"]) == 2


def test_commands_must_be_signed_when_a_key_is_trusted(tmp_path, mosquitto):
    keys = tmp_path / "keys"
    out = fleetctl("keys", "init", "--dir", str(keys))
    assert out.returncode == 0, out.stderr
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        add_agent("pi-s", extra=f'[security]\ntrusted_keys = ["{keys / "controller.pub"}"]\n')
        wait_for(lambda: (x := device(db, "pi-s")) and x.online, what="pi-s online")
        unsigned = fleetctl("--broker", mosquitto.url, "cmd", "pi-s", "ping", "--json")
        assert unsigned.returncode == 1
        assert "unsigned command" in json.loads(unsigned.stdout)["error"]
        other = tmp_path / "other"
        fleetctl("keys", "init", "--dir", str(other))
        wrong = fleetctl("--broker", mosquitto.url, "--signing-key", str(other / "controller.pem"), "cmd", "pi-s", "ping",
                         "--json")
        assert wrong.returncode == 1 and "not trusted" in json.loads(wrong.stdout)["error"]
        signed = fleetctl("--broker", mosquitto.url, "--signing-key", str(keys / "controller.pem"), "cmd", "pi-s", "ping",
                          "--json")
        assert signed.returncode == 0, signed.stdout + signed.stderr
        assert json.loads(signed.stdout)["result"]["pong"] is True
        refused = lambda: [e for e in Registry(db, readonly=True).events("pi-s") if e["event"] == "command.refused"]
        events = wait_for(lambda: len(refused()) >= 2 and refused(), what="two refusal events")
        assert len(events) == 2
        assert {e["body"]["reason"].split(" ")[0] for e in events} == {"unsigned", "command"}
    finally:
        for p in procs:
            stop(p)


def test_bad_trusted_key_is_a_config_error(tmp_path, mosquitto):
    bad = tmp_path / "bad.pub"
    bad.write_text("nope")
    cfg = agent_config(tmp_path, "pi-k", mosquitto.url, extra=f'[security]\ntrusted_keys = ["{bad}"]\n')
    p = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], capture_output=True,
                       text=True, env=ENV, cwd=ROOT, timeout=30)
    assert p.returncode == 78      # EX_CONFIG: the unit's RestartPreventExitStatus, no restart loop
    assert "security.trusted_keys" in p.stderr


def test_telemetry_follow_streams_live_json(fleet, mosquitto, tmp_path):
    db, add_agent = fleet
    add_agent("pi-f")
    p = subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", mosquitto.url, "telemetry", "--follow",
                          "--json", "--device", "pi-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                         cwd=ROOT, text=True)
    try:
        lines = [json.loads(p.stdout.readline()) for _ in range(2)]
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(5)
    assert [x["device"] for x in lines] == ["pi-f", "pi-f"]
    assert lines[1]["body"]["seq"] > lines[0]["body"]["seq"]
    assert p.returncode == 0


def test_cli_errors_are_clear(tmp_path):
    out = fleetctl("--db", str(tmp_path / "none.db"), "devices")
    assert out.returncode == 1 and "no registry" in out.stderr
    bad = fleetctl("--broker", "http://x", "cmd", "pi-1", "ping")
    assert bad.returncode == 2 and "mqtt.broker" in bad.stderr
    wild = fleetctl("--broker", "mqtt://127.0.0.1:1", "cmd", "pi/+", "ping")
    assert wild.returncode == 2 and "DEVICE_ID" in wild.stderr and "contains '+'" in wild.stderr
