"""Faults on the update path: real Mosquitto, real agent processes, SIGKILLs (issue 15, items 3, 5, 6).

The test plays the controller's signing side itself — offers, commands and chunks signed with the
controller's key from a plain MQTT client — so nothing re-offers behind its back: what a board does
after a restart is the board's own doing. The real controller still runs (``signed_fleet``) and
records every device's state and events in its registry.
"""
from __future__ import annotations

import itertools
import json
import threading

import numpy as np
import pytest

from tests.helpers.waiting import Probe, wait_for
from protocol.chunks import make_manifest
from protocol.cmdauth import sign_envelope, sign_frame
from protocol.envelope import Envelope, encode
from protocol.patch import bundle_id, make_patch, read_manifest
from protocol.signing import load_private
from tests.integration.test_rollout_e2e import events, model_of, signed_fleet, variant, with_extra_file  # noqa: F401 - fixture
from tests.helpers.fleet import stop

TIMEOUT = 120


class Signer:
    """The controller's signing side for the tests: signed offers and commands, chunks on request."""

    def __init__(self, port: int, key_path) -> None:
        self.key = load_private(key_path)
        self.probe = Probe(port, subscribe=("edgefleet/v1/dev/+/data/xfer", "edgefleet/v1/dev/+/state",
                                            "edgefleet/v1/dev/+/reply/#"))
        self.transfers: dict[str, tuple[str, bytes, int]] = {}
        self.chunks_sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="chunk-server", daemon=True)
        self._thread.start()
        self._n = 0
        self._ids = itertools.count()

    @staticmethod
    def topic(dev: str) -> str:
        return f"edgefleet/v1/dev/{dev}/cmd"

    @staticmethod
    def bin(dev: str) -> str:
        return f"edgefleet/v1/dev/{dev}/bin"   # the controller's binary frames (chunks)

    def offer(self, dev: str, target, old=None, allow_downgrade: bool | None = None, serve: bool = True) -> bytes:
        """Sign and send an offer for ``target`` (a patch from ``old``, or the full bundle); its wire bytes."""
        data, _ = make_patch(old, target, self.key)
        man = make_manifest(f"{dev}-{bundle_id(target)[:12]}-{next(self._ids)}", data, 65536)
        body = {"rollout_id": None,
                "target": {"version": read_manifest(target)["version"], "bundle_sha256": bundle_id(target)},
                "base": {"version": read_manifest(old)["version"], "bundle_sha256": bundle_id(old)} if old else None,
                "transfer": man.to_dict()}
        if allow_downgrade is not None:
            body["allow_downgrade"] = allow_downgrade
        if serve:
            self.transfers[man.transfer_id] = (dev, data, man.chunk_size)
        return self.send(dev, Envelope(kind="model.offer", sender="controller", body=body))

    def command(self, dev: str, name: str, **args) -> bytes:
        return self.send(dev, Envelope(kind="cmd", sender="controller", body={"command": name, "args": args}))

    def send(self, dev: str, env: Envelope) -> bytes:
        wire = encode(sign_envelope(env, self.topic(dev), self.key))
        self.probe.publish(self.topic(dev), wire)
        return wire

    def replay(self, dev: str, wire: bytes) -> None:
        self.probe.publish(self.topic(dev), wire)

    def _serve(self) -> None:
        while not self._stop.wait(0.05):
            msgs = self.probe.seen()
            new, self._n = msgs[self._n:], len(msgs)
            for t, p, _ in new:
                if not t.endswith("/data/xfer"):
                    continue
                body = json.loads(p)["body"]
                entry = self.transfers.get(body["transfer_id"])
                if entry is None:
                    continue
                dev, data, size = entry
                for i in body["chunks"]:
                    env = Envelope(kind="xfer.chunk", sender="controller",
                                   body={"transfer_id": body["transfer_id"], "index": i})
                    self.probe.publish(self.bin(dev), sign_frame(env, self.bin(dev), self.key,
                                                                   blob=data[i * size:(i + 1) * size]))
                    self.chunks_sent += 1

    def served_versions(self, dev: str) -> list[str]:
        """Every model version the device's state messages ever announced, in order."""
        out = []
        for t, p, _ in self.probe.seen(lambda t, p: t == f"edgefleet/v1/dev/{dev}/state"):
            v = ((json.loads(p)["body"].get("model")) or {}).get("version")
            if v and (not out or out[-1] != v):
                out.append(v)
        return out

    def replies(self, dev: str) -> list[dict]:
        return [json.loads(p)["body"] for t, p, _ in self.probe.seen(lambda t, p: f"/dev/{dev}/reply" in t)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.probe.close()


@pytest.fixture
def signer(signed_fleet, mosquitto):
    s = Signer(mosquitto.port, signed_fleet[3] / "controller.pem")
    yield s
    s.close()


@pytest.fixture(scope="module")
def versions(tmp_path_factory, example_bundle):
    d = tmp_path_factory.mktemp("fault-versions")
    v1 = example_bundle[0]
    good = variant(v1, d / "good", "1.1.0", lambda h: {k: v * 1.01 for k, v in h.items()})
    # 14 agents gate at once on 2 shared cores: the good version must not fail on a preempted timing,
    # only the bad one on its answers (the latency rule has its own tests in tests/agent/test_health.py)
    from protocol.bundle import write_manifest

    m = json.loads((good / "manifest.json").read_text())
    m.setdefault("eval", {})["max_latency_ratio"] = 1000.0
    write_manifest(good, m)
    # loads and matches its own reference outputs, but its labels are scrambled: the gate refuses it
    bad = variant(v1, d / "bad", "1.2.0", lambda h: {k: np.roll(v, 3, axis=-1) for k, v in h.items()})
    return v1, good, bad


def refusals(db, dev):
    from controller.registry import Registry

    return [e["body"]["reason"] for e in Registry(db, readonly=True).events(dev, limit=500)
            if e["event"] == "command.refused"]


def serving(db, dev, version):
    return wait_for(lambda: model_of(db, dev).get("version") == version, timeout=TIMEOUT, what=f"{dev} on {version}")


# -- item 3 -------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_captured_downgrades_replayed_after_a_restart_are_refused(signed_fleet, signer, versions):
    db, add_agent, ctl, keys = signed_fleet
    v1, v2, _ = versions
    agent = add_agent("rp1", v1)
    serving(db, "rp1", "1.0.0")
    signer.offer("rp1", v2, old=v1)
    serving(db, "rp1", "1.1.0")
    # an operator rollback as the controller sends it to a board that keeps the version: captured
    back_offer = signer.offer("rp1", v1, allow_downgrade=True, serve=False)
    serving(db, "rp1", "1.0.0")
    signer.offer("rp1", v2, serve=False)               # kept on the board: a switch forward
    serving(db, "rp1", "1.1.0")
    back_cmd = signer.command("rp1", "model.rollback", bundle_sha256=bundle_id(v1))
    serving(db, "rp1", "1.0.0")
    signer.offer("rp1", v2, serve=False)
    serving(db, "rp1", "1.1.0")

    stop(agent)
    states = lambda: signer.probe.seen(lambda t, p: t == "edgefleet/v1/dev/rp1/state")  # noqa: E731
    n = len(wait_for(lambda: [s for s in states() if b'"offline"' in s[1]] and states(), what="rp1 offline"))
    agent = add_agent("rp1", v1)
    wait_for(lambda: any(b'"online"' in p for _, p, _ in states()[n:]), timeout=TIMEOUT, what="rp1 back online")
    assert ctl("cmd", "rp1", "ping").returncode == 0      # subscribed again: replays reach it
    before = len(signer.served_versions("rp1"))
    signer.replay("rp1", back_offer)
    signer.replay("rp1", back_cmd)
    reasons = wait_for(lambda: len([r for r in refusals(db, "rp1") if "replayed" in r]) >= 2 and refusals(db, "rp1"),
                       timeout=TIMEOUT, what="both replays refused")
    assert any("high-water" in r for r in reasons), reasons
    reply = wait_for(lambda: [r for r in signer.replies("rp1") if "refused" in str(r.get("error", ""))],
                     timeout=TIMEOUT, what="the replayed command's refusal")
    assert "replayed" in reply[-1]["error"]
    assert ctl("cmd", "rp1", "ping").returncode == 0      # a fresh command still goes through
    assert model_of(db, "rp1")["version"] == "1.1.0"
    assert signer.served_versions("rp1")[before - 1:] == ["1.1.0"], signer.served_versions("rp1")


# -- item 5 -------------------------------------------------------------------------------------------
@pytest.mark.timeout(900)
def test_sigkill_at_every_install_step_never_serves_an_ungated_version(signed_fleet, signer, versions, tmp_path):
    """Each install failpoint, with a version that passes its gate and one the gate refuses: after the
    kill and a restart the board serves the old version or the gated new one, and a version killed
    before its verdict is never switched to later (model.rollback, or a kept-version offer)."""
    from agent.updates.modelstore import INSTALL_FAILPOINTS

    from agent.updates.modelstore import ModelStore

    db, add_agent, ctl, keys = signed_fleet
    v1, good, bad = versions
    cases = [(f"{kind[0]}-{point.replace('_', '-')}", point, target)
             for kind, target in (("good", good), ("bad", bad)) for point in INSTALL_FAILPOINTS]
    for dev, _, _ in cases:   # the boards already serve v1 (its first install would hit the failpoints too)
        assert ModelStore(tmp_path / dev / "models").install_bundle_dir(v1).ok
    procs = {dev: add_agent(dev, v1, env={"EDGEFLEET_FAILPOINT": point}) for dev, point, _ in cases}
    for dev, _, _ in cases:
        serving(db, dev, "1.0.0")
    for dev, _, target in cases:
        signer.offer(dev, target, old=v1)

    killed = {}
    for dev, point, target in cases:
        version = read_manifest(target)["version"]
        wait_for(lambda: procs[dev].poll() is not None or
                 any(e.get("version") == version for e in events(db, dev, "applied") + events(db, dev, "rolled_back")),
                 timeout=TIMEOUT, what=f"{dev}: killed at {point} or done")
        killed[dev] = procs[dev].poll() is not None
        if killed[dev]:
            assert procs[dev].returncode == -9, (dev, procs[dev].returncode)
            procs[dev] = add_agent(dev, v1)          # restarted without the failpoint
    missed = {dev: [(e.get("status"), e.get("reason")) for e in events(db, dev, "rolled_back") + events(db, dev, "failed")]
              for dev, _, target in cases if target is good and not killed[dev]}
    assert not missed, missed
    assert killed["b-gate"] and killed["b-staged"], killed

    for dev, point, target in cases:
        if target is good:
            serving(db, dev, "1.1.0")   # applied (at start from the complete part file, or already switched)
        else:
            wait_for(lambda: events(db, dev, "rolled_back"), timeout=TIMEOUT, what=f"{dev}: the gate refused 1.2.0")
            serving(db, dev, "1.0.0")
            assert bundle_id(bad) not in [i["bundle_sha256"] for i in model_of(db, dev)["installed"]]
    # a version killed before its verdict is not "kept": neither path switches to it
    for dev, point, target in cases:
        if target is bad:
            signer.command(dev, "model.rollback", bundle_sha256=bundle_id(bad))
            signer.offer(dev, bad, old=v1, serve=False)
    for dev, point, target in cases:
        if target is bad:
            wait_for(lambda: any("not installed here" in str(r.get("error")) for r in signer.replies(dev)),
                     timeout=TIMEOUT, what=f"{dev}: rollback to the refused version refused")
    for dev, point, target in cases:
        ever = signer.served_versions(dev)
        assert "1.2.0" not in ever, (dev, ever)
        assert set(ever) <= {"1.0.0", "1.1.0"}, (dev, ever)
        assert model_of(db, dev)["version"] == ("1.1.0" if target is good else "1.0.0"), dev


# -- item 6 -------------------------------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_an_agent_killed_after_the_last_chunk_applies_the_patch_at_start(signed_fleet, signer, versions, tmp_path):
    from agent.updates.transfer import PartFile
    from protocol.chunks import ChunkManifest

    db, add_agent, ctl, keys = signed_fleet
    v1 = versions[0]
    big = with_extra_file(v1, tmp_path / "big", "2.0.0", 300_000)
    agent = add_agent("pc1", v1, env={"EDGEFLEET_FAILPOINT": "transfer_complete"})
    serving(db, "pc1", "1.0.0")
    signer.offer("pc1", big, old=v1)
    assert agent.wait(TIMEOUT) == -9
    offer = next((tmp_path / "pc1" / "transfers").glob("*/offer.json"))
    man = ChunkManifest.from_dict(json.loads(offer.read_text())["transfer"])
    assert man.count > 1 and len(PartFile(offer.parent, man).held()) == man.count
    signer.transfers.clear()                          # nobody offers or serves anything from now on
    sent = signer.chunks_sent
    add_agent("pc1", v1)
    serving(db, "pc1", "2.0.0")
    applied = wait_for(lambda: events(db, "pc1", "applied"), timeout=TIMEOUT, what="the applied event")[-1]
    assert applied["version"] == "2.0.0" and applied["held_at_start"] == man.count, applied
    assert signer.chunks_sent == sent
    assert not list((tmp_path / "pc1" / "transfers").glob("*"))
