"""The site tier on real parts: a central Mosquitto, two site Mosquittos bridged with the config
``fleetctl site bridge-config`` writes (through counting uplink proxies), a signed controller at the
centre, real agents behind the sites and a real relay on farm-1's gateway.

The contract across the bridge (retained state, last will, MQTT 5 request/response properties,
signed commands), a rollout by site through the relay (its uplink carries about one copy), a relay
serving corrupt chunks (boards refuse them and fetch from the centre), a relay killed mid-rollout
(the rollout completes), and a board moving between sites."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

import protocol.rollout  # noqa: F401 - registers xfer.want/xfer.chunk
from protocol.envelope import Envelope, encode
from protocol.sites import relay_chunk_topic, relay_state_topic, relay_want_topic, relay_status_topic
from tests.helpers.fleet import ENV, ROOT, agent_config, device, fleetctl, stop
from tests.helpers.sites import SiteTier
from tests.helpers.waiting import Probe, wait_for
from tests.integration.test_rollout_e2e import events, model_of, start_signed_controller, with_extra_file

BOARDS = {"farm-1": ["b1", "b2"], "farm-2": ["c1", "m1"]}


class Tier:
    """The module's fleet: brokers, controller, agents and the relay, each startable by name."""

    def __init__(self, tmp, bundle) -> None:
        self.tmp, self.v1 = tmp, bundle
        self.sites = SiteTier(tmp, list(BOARDS), boards=BOARDS).start()
        self.keys = tmp / "keys"
        assert fleetctl("keys", "init", "--dir", str(self.keys)).returncode == 0
        self.db = tmp / "registry.db"
        self.centre = self.sites.centre
        self.procs: dict[str, subprocess.Popen] = {}
        self.procs["controller"] = start_signed_controller(self.centre.url, self.db, self.keys / "controller.pem",
                                                           tmp / "controller.log")

    def ctl(self, *args, timeout=120):
        return fleetctl("--broker", self.centre.url, "--db", str(self.db), "--signing-key",
                        str(self.keys / "controller.pem"), *args, timeout=timeout)

    def agent(self, dev: str, site: str) -> subprocess.Popen:
        s = self.sites.sites[site]
        cfg = agent_config(self.tmp, dev, s.url, interval=0.5,
                           extra=f'[model]\nbundle = "{self.v1}"\ntransfer_retry_s = 1.0\nrelay_stall_s = 5\n'
                                 f'[security]\ntrusted_keys = ["{self.keys / "controller.pub"}"]\n')
        cfg.write_text(cfg.read_text().replace("[device]\n", f'[device]\nsite = "{site}"\n', 1))
        p = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                             stdout=open(self.tmp / f"{dev}.log", "ab"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        self.procs[dev] = p
        return p

    def relay(self, site: str = "farm-1") -> subprocess.Popen:
        s = self.sites.sites[site]
        cfg = self.tmp / f"relay-{site}.toml"
        cfg.write_text(f'[device]\nid = "relay-{site}"\nsite = "{site}"\n[mqtt]\nbroker = "{s.url}"\nkeepalive = 5\n'
                       f'min_backoff_s = 0.2\nmax_backoff_s = 1.0\n[state]\ndir = "{self.tmp / ("relay-" + site)}"\n'
                       f'[relay]\nenabled = true\nupstream = "{s.uplink_url}"\nretry_s = 1.0\n')
        p = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
                             stdout=open(self.tmp / f"relay-{site}.log", "ab"), stderr=subprocess.STDOUT, env=ENV,
                             cwd=ROOT)
        self.procs[f"relay-{site}"] = p
        return p

    def telemetry(self, dev: str) -> dict:
        d = device(self.db, dev)
        return ((d.telemetry or {}).get("update") or {}) if d else {}

    def stop(self) -> None:
        for p in self.procs.values():
            stop(p)
        self.sites.stop()


@pytest.fixture(scope="module")
def tier(tmp_path_factory, example_bundle):
    t = Tier(tmp_path_factory.mktemp("sites"), example_bundle[0])
    t.relay("farm-1")
    for site, boards in BOARDS.items():
        for b in boards:
            if b != "m1":
                t.agent(b, site)
    try:
        for b in ("b1", "b2", "c1"):
            wait_for(lambda: model_of(t.db, b).get("version") == "1.0.0", timeout=90, what=f"{b} online on 1.0.0")
        wait_for(lambda: device(t.db, "relay-farm-1") and device(t.db, "relay-farm-1").online, timeout=30,
                 what="the relay registered at the centre")
        yield t
    finally:
        t.stop()


def test_contract_across_the_bridge(tier):
    # retained state crossed with its retain flag: a client that subscribes later at the centre gets it
    probe = Probe(tier.centre.port, subscribe=("edgefleet/v1/dev/b1/state",)).wait_subscribed()
    try:
        st = probe.wait(lambda t, p: True, timeout=30, what="b1's retained state at the centre")[0]
        assert st[2] is True and json.loads(st[1])["body"]["site"] == "farm-1"
    finally:
        probe.close()
    # the registry knows each board's site; `devices --json` and --site show it
    listed = {d["id"]: d for d in json.loads(tier.ctl("devices", "--json").stdout)["devices"]}
    assert listed["b1"]["site"] == "farm-1" and listed["c1"]["site"] == "farm-2"
    assert listed["relay-farm-1"]["site"] == "farm-1"
    # request/response and signed commands: fleetctl at the centre -> board behind farm-2 (a signed
    # cmd, the reply back up through the bridge with its correlation)
    out = tier.ctl("cmd", "ping", "--site", "farm-2", "--json", "--timeout", "20", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["replies"]["c1"]["ok"] is True
    # MQTT 5 properties cross both ways: response topic, correlation data, content type, user properties
    from paho.mqtt.properties import Properties
    from paho.mqtt.packettypes import PacketTypes

    got = []
    site = Probe(tier.sites.sites["farm-1"].port, subscribe=("edgefleet/v1/dev/b1/req",)).wait_subscribed()
    site.client.on_message = lambda c, u, m: got.append(m)
    centre = Probe(tier.centre.port)
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic, props.CorrelationData = "edgefleet/v1/dev/b1/reply/x", b"corr-1"
        props.ContentType, props.UserProperty = "application/json", [("k", "v")]
        centre.client.publish("edgefleet/v1/dev/b1/req", b"{}", 1, properties=props).wait_for_publish(5)
        wait_for(lambda: got, timeout=30, what="the request at the site")
        p = got[0].properties
        assert (p.ResponseTopic, p.CorrelationData, p.ContentType) == ("edgefleet/v1/dev/b1/reply/x", b"corr-1",
                                                                       "application/json")
        assert ("k", "v") in p.UserProperty
    finally:
        site.close()
        centre.close()


def test_rollout_by_site_through_the_relay(tier):
    v2 = with_extra_file(tier.v1, tier.tmp / "v2", "1.1.0", 700_000)
    before = tier.sites.counts()
    out = tier.ctl("deploy", str(v2), "--from", str(tier.v1), "--all", "--by-site", "--soak", "0s", "--wait",
                   "--json", "--timeout", "120s", timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["status"] == "done", r
    waves = {d["device"]: d["wave"] for d in r["devices"]}
    assert waves == {"b1": 0, "c1": 0, "b2": 1}, waves          # canary: one board per site; then the sites
    after = tier.sites.counts()
    patch = max(e.get("bytes", 0) for e in events(tier.db, "b1", "applied"))
    down = after["farm-1"]["down_publish_bytes"] - before["farm-1"]["down_publish_bytes"]
    # two boards behind the relay: the uplink carried about one copy (signed frames' overhead aside)
    assert 0.9 * patch < down < 1.3 * patch, (down, patch)
    for b in ("b1", "b2"):
        applied = events(tier.db, b, "applied")[-1]
        assert applied["version"] == "1.1.0"
    # the relay served them (boards count what came from it); c1 (no relay on farm-2) got the centre's
    status_probe = Probe(tier.sites.sites["farm-1"].port, subscribe=(relay_status_topic("edgefleet", "farm-1"),))
    try:
        def both_served(t, p):   # the status comes every 2 s: wait for the one after b2's last chunk
            c = json.loads(p)["counters"]
            return c.get("chunks.pulled", 0) >= 1 and c.get("chunks.served", 0) >= 2 * c["chunks.pulled"]

        st = json.loads(status_probe.wait(both_served, timeout=20, what="the relay served both boards")[-1][1])
        # each chunk crossed the uplink once (no re-pull), and went to both boards from the cache
        assert st["counters"]["chunks.pulled_bytes"] < 1.1 * patch
    finally:
        status_probe.close()
    c1_down = after["farm-2"]["down_publish_bytes"] - before["farm-2"]["down_publish_bytes"]
    assert c1_down > 0.9 * patch


def test_relay_serving_corrupt_chunks_is_refused_and_the_centre_serves(tier):
    """A fake relay on farm-2 answers every want with bytes that fail the signed hash: the board
    refuses each, falls back to the centre, and installs the right bytes."""
    fake = Probe(tier.sites.sites["farm-2"].port, subscribe=(relay_want_topic("edgefleet", "farm-2", "c1"),),
                 client_id="fake-relay").wait_subscribed()
    state = encode(Envelope(kind="state", sender="fake-relay", body={"status": "online", "role": "relay"}))
    fake.publish(relay_state_topic("edgefleet", "farm-2"), state, retain=True)
    served = []

    def on_message(client, userdata, m):
        from protocol.binary import encode_frame
        from protocol import envelope as env_mod

        env = env_mod.decode(m.payload)
        for i in env.body["chunks"]:
            frame = encode_frame(Envelope(kind="xfer.chunk", sender="fake-relay",
                                          body={"transfer_id": env.body["transfer_id"], "index": i}),
                                 blob=os.urandom(1000))
            client.publish(relay_chunk_topic("edgefleet", "farm-2", "c1"), frame, 1)
            served.append(i)
    fake.client.on_message = on_message
    try:
        v3 = with_extra_file(tier.v1, tier.tmp / "v3", "1.2.0", 300_000)
        out = tier.ctl("deploy", str(v3), "--from", str(tier.v1), "--to", "c1", "--canary", "0", "--soak", "0s",
                       "--wait", "--json", "--timeout", "90s", timeout=150)
        assert out.returncode == 0, out.stdout + out.stderr
        assert served, "the board never asked the (fake) relay"
        wait_for(lambda: model_of(tier.db, "c1").get("version") == "1.2.0", timeout=30, what="c1 on 1.2.0")
        t = wait_for(lambda: tier.telemetry("c1").get("relay_bad_chunks", 0) >= 3 and tier.telemetry("c1"),
                     timeout=20, what="c1 counted the relay's bad chunks")
        assert t["relay_fallbacks"] >= 1 and t["relay_chunks"] == 0
    finally:
        fake.publish(relay_state_topic("edgefleet", "farm-2"), b"", retain=True)
        fake.close()


def test_relay_killed_mid_rollout_and_a_restart_loses_nothing(tier):
    v4 = with_extra_file(tier.v1, tier.tmp / "v4", "1.3.0", 500_000)
    relay = tier.procs["relay-farm-1"]
    out = tier.ctl("deploy", str(v4), "--from", str(tier.v1), "--site", "farm-1", "--by-site", "--soak", "0s",
                   "--json", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    rid = json.loads(out.stdout)["rollout_id"]
    # the canary (b1) through the relay; then the relay dies (SIGKILL: its will says offline)
    wait_for(lambda: model_of(tier.db, "b1").get("version") == "1.3.0", timeout=90, what="b1 on 1.3.0")
    relay.send_signal(signal.SIGKILL)
    relay.wait(10)
    wait_for(lambda: model_of(tier.db, "b2").get("version") == "1.3.0", timeout=90, what="b2 on 1.3.0 (centre)")
    st = tier.ctl("rollout", "status", rid, "--json")
    assert json.loads(st.stdout)["status"] in ("done", "running"), st.stdout
    wait_for(lambda: json.loads(tier.ctl("rollout", "status", rid, "--json").stdout)["status"] == "done",
             timeout=30, what="the rollout done")
    # restarted, the relay finds its cache and its transfers on disk
    tier.relay("farm-1")
    probe = Probe(tier.sites.sites["farm-1"].port, subscribe=(relay_status_topic("edgefleet", "farm-1"),))
    try:
        def restored():
            for _, p, _ in probe.seen():
                s = json.loads(p)
                if s.get("chunks", {}).get("cache", {}).get("chunks", 0) > 0 and s["ts"] > 0 and \
                        s.get("counters", {}).get("chunks.pulled", 0) == 0:
                    return s
        s = wait_for(restored, timeout=30, what="the restarted relay's status")
        assert s["chunks"]["cache"]["bytes"] >= 500_000 and not s["chunks"]["pulling"]
    finally:
        probe.close()


def test_board_moving_between_sites(tier):
    """m1 speaks the board's state contract (as agent/app.py writes it, with its will) first behind
    farm-2's broker, then — a new config — behind farm-1's: the registry follows, and a will keeps
    the site it last knew."""
    def board(site):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="m1", protocol=mqtt.MQTTv5)
        will = encode(Envelope(kind="state", sender="m1", body={"status": "offline", "group": "default",
                                                                "site": site, "last_will": True}))
        c.will_set("edgefleet/v1/dev/m1/state", will, 1, True)
        c.connect("127.0.0.1", tier.sites.sites[site].port)
        c.loop_start()
        online = encode(Envelope(kind="state", sender="m1", body={"status": "online", "group": "default",
                                                                  "site": site}))
        c.publish("edgefleet/v1/dev/m1/state", online, 1, True).wait_for_publish(10)
        return c

    c = board("farm-2")
    try:
        wait_for(lambda: (d := device(tier.db, "m1")) is not None and d.online and d.site == "farm-2", timeout=30,
                 what="m1 registered behind farm-2")
    finally:
        c.disconnect()
        c.loop_stop()
    c = board("farm-1")
    try:
        wait_for(lambda: (d := device(tier.db, "m1")) is not None and d.online and d.site == "farm-1", timeout=30,
                 what="m1 now behind farm-1")
        out = tier.ctl("devices", "--json")
        assert {d["id"]: d["site"] for d in json.loads(out.stdout)["devices"]}["m1"] == "farm-1"
    finally:
        c.socket().close()   # dropped, not disconnected: the broker publishes its will
        c.loop_stop()
    wait_for(lambda: not device(tier.db, "m1").online, timeout=30, what="m1's will at the centre")
    assert device(tier.db, "m1").site == "farm-1"
