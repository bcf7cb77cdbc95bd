"""A signed patch that carries a model for the sensor MCU: real agent, Mosquitto, pty, simulator.

The test plays the controller on the broker (a signed offer, then the chunks the agent asks
for). The agent verifies and health-checks the bundle, pushes the changed ``mcu`` file over the
firmware bridge, and reports the update applied only when the MCU ACKed it; when the MCU
refuses it, the board goes back to the previous version by itself.
"""
import asyncio
import json
import shutil
import threading

import pytest

from agent.core.config import parse_config
from agent.mcu.feature import McuBridge
from firmware_bridge.simulator import MCUSimulator
from protocol.bundle import write_manifest
from protocol.chunks import make_manifest
from protocol.cmdauth import sign_envelope, sign_frame
from protocol.envelope import Envelope, encode
from protocol.patch import bundle_id, make_patch
from protocol.signing import generate, save_keypair
from tests.helpers.serial import TFLITE, running
from tests.helpers.waiting import Probe, until

FLOAT = TFLITE.with_name("digits_float.tflite")


def with_mcu_file(src, out, version, blob_path):
    shutil.copytree(src, out)
    shutil.copy(blob_path, out / "mcu_model.tflite")
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["mcu_model.tflite"] = {"role": "mcu"}
    m["version"] = version
    write_manifest(out, m)
    return out


class FakeControllerOnTheBroker:
    """Answers the agent's xfer.want with signed chunks of one patch (what fleetctl serve does)."""

    def __init__(self, port, device, key, data):
        self.topic = f"edgefleet/v1/dev/{device}/cmd"
        self.bin = f"edgefleet/v1/dev/{device}/bin"   # chunks are binary frames: the bin topic
        self.key, self.data = key, data
        self.man = make_manifest("mcu-update", data, 65536)
        self.probe = Probe(port, subscribe=(f"edgefleet/v1/dev/{device}/#",))
        self.sent: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def offer(self, target_dir, base_dir):
        body = {"rollout_id": None, "target": {"version": json.loads((target_dir / "manifest.json").read_text())
                                               ["version"], "bundle_sha256": bundle_id(target_dir)},
                "base": {"version": "1.0.0", "bundle_sha256": bundle_id(base_dir)}, "transfer": self.man.to_dict()}
        self.probe.publish(self.topic, encode(sign_envelope(Envelope(kind="model.offer", sender="controller",
                                                                     body=body), self.topic, self.key)))

    def _serve(self):
        import time

        seen = 0
        while not self._stop.is_set():
            wants = [json.loads(p)["body"] for t, p, _ in self.probe.seen() if t.endswith("/data/xfer")]
            for w in wants[seen:]:
                for i in w["chunks"]:
                    blob = self.data[i * self.man.chunk_size:(i + 1) * self.man.chunk_size]
                    env = Envelope(kind="xfer.chunk", sender="controller",
                                   body={"transfer_id": self.man.transfer_id, "index": i})
                    self.probe.publish(self.bin, sign_frame(env, self.bin, self.key, blob=blob))
            seen = len(wants)
            time.sleep(0.02)

    def events(self, name):
        return [json.loads(p)["body"] for t, p, _ in self.probe.seen()
                if t.endswith("/events") and json.loads(p)["body"]["event"] == name]

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.probe.close()


@pytest.mark.parametrize("flash_bytes,ok", [(256 << 10, True), (8 << 10, False)])
def test_patch_with_an_mcu_model_is_applied_only_when_the_mcu_acks_it(tmp_path, mosquitto, example_bundle,
                                                                    digits_test, pty, flash_bytes, ok):
    from agent.app import Agent

    x, _ = digits_test
    v1 = with_mcu_file(example_bundle[0], tmp_path / "v1", "1.0.0", TFLITE)
    v2 = with_mcu_file(example_bundle[0], tmp_path / "v2", "1.1.0", FLOAT)   # only the MCU's model changes
    key = generate()
    save_keypair(key, tmp_path / "k.pem", tmp_path / "k.pub")
    data, pm = make_patch(v1, v2, key)
    assert sorted(pm["files"]) == ["manifest.json", "mcu_model.tflite"]
    p = pty()
    sim = MCUSimulator(p.master, "mcu-7", x[:20], rate_hz=20, heartbeat_s=0.2, flash_bytes=flash_bytes).start()
    cfg = parse_config({"device": {"id": "pi-u"}, "mqtt": {"broker": mosquitto.url},
                        "state": {"dir": str(tmp_path / "state")}, "telemetry": {"interval_s": 0.5},
                        "homeassistant": {"enabled": True}, "model": {"bundle": str(v1)},
                        "security": {"trusted_keys": [str(tmp_path / "k.pub")]},
                        "bridge": {"enabled": True, "port": p.name, "push_ack_timeout_s": 0.2}})
    ctl = FakeControllerOnTheBroker(mosquitto.port, "pi-u", key, data)

    ha = Probe(mosquitto.port, subscribe=("homeassistant/+/pi-u/+/config",))

    async def main():
        async with running(Agent(cfg)) as agent:
            await until(lambda: agent.feature(McuBridge).attached == "mcu-7", what="the MCU's HELLO")
            ctl.offer(v2, v1)
            final = await until(lambda: [e for e in ctl.events("model.update")
                                         if e["status"] in ("applied", "rolled_back", "failed")],
                                timeout=30, what="the update's final event")
            return agent, final[-1]

    try:
        agent, final = asyncio.run(main())
        # the MCU is its own Home Assistant device, behind the board, fed from the board's telemetry
        mcu_cfgs = [json.loads(p) for t, p, _ in ha.seen() if "/mcu_mcu-7_" in t]
        assert {c["unique_id"].rsplit("_", 1)[-1] for c in mcu_cfgs} >= {"online", "results", "uptime"}
        assert all(c["device"]["via_device"] == "edgefleet_pi-u" and c["state_topic"].endswith("pi-u/telemetry")
                   for c in mcu_cfgs)
    finally:
        sim.stop()
        ctl.close()
        ha.close()
    if ok:
        assert final["status"] == "applied", final
        assert sim.state.model == FLOAT.read_bytes()
        assert ctl.events("mcu.model.pushed")[0]["file"] == "mcu_model.tflite"
        assert agent.serving.engine.bundle.manifest.version == "1.1.0"
    else:
        assert final["status"] == "rolled_back" and "the MCU refused mcu_model.tflite: no_space" in final["reason"]
        assert ctl.events("mcu.model.failed")[0]["reason"] == "no_space"
        assert agent.serving.engine.bundle.manifest.version == "1.0.0"
        assert bundle_id(agent.serving.store.current) == bundle_id(v1)


def test_killed_while_pushing_to_the_mcu_the_board_goes_back(tmp_path, mosquitto, example_bundle, digits_test, pty):
    """SIGKILL after the switch, while the MCU's new model is on its way: at the next start the agent
    returns to the version whose model the MCU still runs, and says why."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    x, _ = digits_test
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONUNBUFFERED": "1"}
    v1 = with_mcu_file(example_bundle[0], tmp_path / "v1", "1.0.0", TFLITE)
    v2 = with_mcu_file(example_bundle[0], tmp_path / "v2", "1.1.0", FLOAT)
    key = generate()
    save_keypair(key, tmp_path / "k.pem", tmp_path / "k.pub")
    data, _ = make_patch(v1, v2, key)
    p = pty()
    sim = MCUSimulator(p.master, "mcu-8", x[:20], rate_hz=20, heartbeat_s=0.2).start()
    conf = tmp_path / "agent.toml"
    conf.write_text(f'[device]\nid = "pi-k"\n[mqtt]\nbroker = "{mosquitto.url}"\nmin_backoff_s = 0.2\n'
                    f'max_backoff_s = 1.0\n[telemetry]\ninterval_s = 0.5\n[homeassistant]\nenabled = false\n'
                    f'[state]\ndir = "{tmp_path / "state"}"\n[model]\nbundle = "{v1}"\n'
                    f'[security]\ntrusted_keys = ["{tmp_path / "k.pub"}"]\n'
                    f'[bridge]\nenabled = true\nport = "{p.name}"\n')
    ctl = FakeControllerOnTheBroker(mosquitto.port, "pi-k", key, data)

    def start(extra_env):
        return subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)], cwd=root,
                                env={**env, **extra_env}, stdout=open(tmp_path / "agent.log", "ab"),
                                stderr=subprocess.STDOUT)

    def state_version():
        states = [json.loads(pl)["body"] for t, pl, _ in ctl.probe.seen() if t.endswith("pi-k/state")]
        return ((states[-1].get("model") or {}).get("version")) if states else None

    agent = start({"EDGEFLEET_FAILPOINT": "mcu_push"})
    try:
        deadline = time.monotonic() + 30
        while not [e for e in ctl.events("mcu.hello")] and time.monotonic() < deadline:
            time.sleep(0.05)
        ctl.offer(v2, v1)
        assert agent.wait(30) == -9                         # died right after the switch, before the push
        assert (tmp_path / "state" / "mcu-push-pending.json").exists()
        agent = start({})
        deadline = time.monotonic() + 30
        while not ctl.events("model.update")[-1:] or ctl.events("model.update")[-1]["status"] != "rolled_back":
            assert time.monotonic() < deadline, [e["status"] for e in ctl.events("model.update")]
            time.sleep(0.05)
        last = ctl.events("model.update")[-1]
        assert "interrupted while pushing" in last["reason"] and last["version"] == "1.1.0"
        deadline = time.monotonic() + 10
        while state_version() != "1.0.0":
            assert time.monotonic() < deadline, state_version()
            time.sleep(0.05)
        assert not (tmp_path / "state" / "mcu-push-pending.json").exists()
        assert sim.state.model == b""                       # the MCU never got half a model to run
    finally:
        if agent.poll() is None:
            agent.terminate()
            agent.wait(5)
        sim.stop()
        ctl.close()
