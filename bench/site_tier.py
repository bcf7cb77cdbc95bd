"""Site tier: uplink bytes per site for a rollout of a large patch, with the site relay vs without.

Topology (``build_topology``, reused by ``bench/site_tier_fl.py``): a central Mosquitto and a signed
``fleetctl serve`` at the centre; 2 sites, each a Mosquitto bridged to the centre with the config
``fleetctl site bridge-config`` writes (per-board downlink rules), through a counting TCP proxy
that counts whole MQTT PUBLISH packets each way (tests/helpers/sites.py). Behind each site: N
boards — one real ``edge-agent`` (ONNX Runtime, the real updater) and N-1 simulated boards that
speak the same update protocol (retained state with a last will, signed offers, ``xfer.want``,
chunks checked against the offer's hashes, ``model.update`` events, the new bundle in the state);
and, when the relay is on, ``edge-agent`` in the relay role on the site's gateway, whose own
upstream link goes through the same proxy.

Two rollouts of a patch with a ``--extra`` MB random file (incompressible) to every board, by site:
first with the relays, then with the relays stopped (every board fetches from the centre, as
today). Figures: ``relay_uplink_copies`` / ``direct_uplink_copies`` = the bytes of PUBLISH packets
that came down each site's uplink during the rollout ÷ the patch's bytes (mean over the sites;
goal ≤ 1.1 with the relay, vs N without); ``rollout_s``: the relay rollout's wall time (and the
direct one's, as the ratio ``relay_vs_direct_time``). ``--quick``: N = 3, a 2 MB patch.
When ``bench/site_tier_fl.py`` exists, its ``run(topology, quick)`` dict is merged into the JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol import envelope as env_mod  # noqa: E402
import protocol.rollout as ro  # noqa: E402
from protocol.binary import decode_frame, is_frame  # noqa: E402
from protocol.envelope import DecodeError, Envelope, encode  # noqa: E402
from protocol.mqttlink import BrokerAddress, MqttLink, Will  # noqa: E402
from protocol.sites import relay_chunk_topic, relay_state_topic, relay_want_topic  # noqa: E402
from protocol.topics import Topics  # noqa: E402

SITES = ("farm-1", "farm-2")
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "FLEETCTL_DEPLOY_SOAK": "0s",
       "OPENBLAS_NUM_THREADS": "1"}


# -- a simulated board: the update protocol of agent/updates, no model runtime ----------------------
class SimBoard:
    """Connects to its site broker, announces a bundle, and takes offers like agent/updates does:
    asks the relay while its retained state says online (else the centre), checks every chunk
    against the offer's manifest, reports ``applied`` and announces the new bundle."""

    def __init__(self, dev: str, site: str, port: int, bundle: dict[str, Any], window: int = 32) -> None:
        self.dev, self.site, self.port, self.model = dev, site, port, dict(bundle)
        self.t = Topics()
        self.window = window
        self.relay_online = False
        self.transfer: Any = None
        self.offer: dict[str, Any] | None = None
        self.parts: dict[int, bytes] = {}
        self.link: MqttLink | None = None

    def state(self, status: str) -> bytes:
        body = {"status": status, "group": "default", "site": self.site}
        if status == "online":
            body["model"] = {**self.model, "installed": [{"version": self.model["version"],
                                                          "bundle_sha256": self.model["bundle_sha256"]}]}
        return encode(Envelope(kind="state", sender=self.dev, body=body))

    async def start(self) -> None:
        subs = [(self.t.cmd(self.dev), 1), (self.t.bin(self.dev), 1),
                (relay_state_topic("edgefleet", self.site), 1), (relay_chunk_topic("edgefleet", self.site, self.dev), 1)]
        self.link = MqttLink(self.dev, BrokerAddress("127.0.0.1", self.port), protocol="5", keepalive=10,
                             will=Will(self.t.state(self.dev), self.state("offline"), 1, True), subscriptions=subs,
                             on_connect=self._on_connect, min_backoff=0.2, max_backoff=1.0)
        await self.link.start()
        asyncio.ensure_future(self._loop())
        asyncio.ensure_future(self._retry())

    def _on_connect(self) -> None:
        assert self.link is not None
        self.link.publish(self.t.state(self.dev), self.state("online"), 1, True)
        self._ask(force=True)

    async def _loop(self) -> None:
        assert self.link is not None
        while True:
            msg = await self.link.messages.get()
            try:
                self._handle(msg)
            except (DecodeError, KeyError, ValueError) as exc:
                print(f"{self.dev}: refused a message on {msg.topic}: {exc}", file=sys.stderr)

    async def _retry(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self._ask()

    def _handle(self, msg: Any) -> None:
        if msg.topic == relay_state_topic("edgefleet", self.site):
            env = env_mod.decode(msg.payload) if msg.payload else None
            self.relay_online = bool(env and env.body.get("status") == "online")
            self._ask(force=True)
            return
        if is_frame(msg.payload):
            frame = decode_frame(msg.payload)
            if frame.envelope.kind == "xfer.chunk":
                self._chunk(frame.envelope.body, frame.blob)
            return
        env = env_mod.decode(msg.payload)
        if env.kind == "xfer.unavailable":
            self.relay_online = False
        elif env.kind == "model.offer":
            self._on_offer(env.body)

    def _on_offer(self, offer: dict[str, Any]) -> None:
        from agent.updates.transfer import Transfer

        m = ro.offer_manifest(offer)
        if offer["target"]["bundle_sha256"] == self.model["bundle_sha256"]:
            return
        if self.transfer is not None and self.transfer.manifest.transfer_id == m.transfer_id:
            return
        self.offer, self.parts = offer, {}
        self.transfer = Transfer(m, window=8, retry_s=1.0, max_window=self.window)
        self._event("downloading")
        self._ask(force=True)

    def _chunk(self, body: dict[str, Any], blob: bytes) -> None:
        t = self.transfer
        if t is None or body.get("transfer_id") != t.manifest.transfer_id:
            return
        try:
            new = t.accept(body["index"], blob, time.monotonic())   # the hash the offer carries
        except Exception:   # noqa: BLE001 - a bad chunk: counted by the transfer, asked again
            return
        if new:
            self.parts[body["index"]] = blob
        if t.complete:
            data = b"".join(self.parts[i] for i in range(t.count))
            assert hashlib.sha256(data).hexdigest() == t.manifest.sha256
            target = self.offer["target"]
            self.model = {**self.model, "version": target["version"], "bundle_sha256": target["bundle_sha256"]}
            self._event("applied", bytes=t.manifest.total_size)
            assert self.link is not None
            self.link.publish(self.t.state(self.dev), self.state("online"), 1, True)
            self.transfer, self.parts = None, {}
        else:
            self._ask()

    def _event(self, status: str, **kw: Any) -> None:
        assert self.link is not None and self.offer is not None
        o = self.offer
        body = {"event": "model.update", "level": "info", "status": status, "reason": "",
                "rollout_id": o.get("rollout_id"), "transfer_id": o["transfer"]["transfer_id"],
                "version": o["target"]["version"], "bundle_sha256": o["target"]["bundle_sha256"], **kw}
        self.link.publish(self.t.events(self.dev), encode(Envelope(kind="event", sender=self.dev, body=body)), 1)

    def _ask(self, force: bool = False) -> None:
        t, link = self.transfer, self.link
        if t is None or link is None or not link.connected.is_set():
            return
        want = t.wants(time.monotonic(), force=force)
        topic = (relay_want_topic("edgefleet", self.site, self.dev) if self.relay_online
                 else self.t.data(self.dev, ro.XFER_DATA_LEAF))
        for i in range(0, len(want), ro.MAX_WANT):
            env = Envelope(kind="xfer.want", sender=self.dev, body={"transfer_id": t.manifest.transfer_id,
                                                                    "chunks": want[i:i + ro.MAX_WANT]})
            link.publish(topic, encode(env), 1)


# -- the topology --------------------------------------------------------------------------------
@dataclass
class Topology:
    """Everything one run needs; ``build_topology`` starts it, ``stop()`` ends it (sitefl19 reuses it)."""
    tmp: Path
    tier: Any
    db: Path
    keys: Path
    v1: Path
    boards: dict[str, list[str]]
    real: set[str]
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    sims: list[SimBoard] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None

    def ctl(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "controller.cli", "--broker", self.tier.centre.url, "--db",
                               str(self.db), "--signing-key", str(self.keys / "controller.pem"), *args],
                              capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=timeout)

    def start_relay(self, site: str) -> None:
        s = self.tier.sites[site]
        cfg = self.tmp / f"relay-{site}.toml"
        cfg.write_text(f'[device]\nid = "relay-{site}"\nsite = "{site}"\n[mqtt]\nbroker = "{s.url}"\nkeepalive = 10\n'
                       f'min_backoff_s = 0.2\nmax_backoff_s = 1.0\n[state]\ndir = "{self.tmp / ("relay-" + site)}"\n'
                       f'[relay]\nenabled = true\nupstream = "{s.uplink_url}"\nretry_s = 1.0\n')
        self.procs[f"relay-{site}"] = _spawn(["agent.cli", "run", "--config", str(cfg)], self.tmp / f"relay-{site}.log")

    def stop_relay(self, site: str) -> None:
        p = self.procs.pop(f"relay-{site}", None)
        if p is not None:
            _stop(p)

    def counts(self) -> dict[str, dict[str, int]]:
        return self.tier.counts()

    def stop(self) -> None:
        for p in self.procs.values():
            _stop(p)
        if self.loop is not None:
            async def _close() -> None:
                for sim in self.sims:
                    if sim.link is not None:
                        await sim.link.stop()
                for t in asyncio.all_tasks():
                    if t is not asyncio.current_task():
                        t.cancel()
            try:
                asyncio.run_coroutine_threadsafe(_close(), self.loop).result(15)
            except Exception:  # noqa: BLE001 - tearing down: what is left dies with the process
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.tier.stop()


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                            env=ENV, cwd=ROOT)


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def wait_until(pred: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.1)
    raise SystemExit(f"site_tier: timed out after {timeout:g}s waiting for {what}")


def build_topology(tmp: Path, n_per_site: int, real_per_site: int = 1, relays: bool = True,
                   sites: tuple[str, ...] = SITES) -> Topology:
    """Brokers, bridges (counted), a signed controller, relays, real agents and simulated boards, all
    online on bundle 1.0.0 (the example digits bundle)."""
    from protocol.patch import bundle_id
    from tests.helpers.bundles import example_into
    from tests.helpers.fleet import device as _device
    from tests.helpers.sites import SiteTier

    v1, _ = example_into(tmp / "digits-1.0.0", size="small", seed=0, epochs=30)
    boards = {s: [f"{s}-b{i}" for i in range(n_per_site)] for s in sites}
    real = {b for s in sites for b in boards[s][:real_per_site]}
    tier = SiteTier(tmp, list(sites), boards=boards).start()
    keys = tmp / "keys"
    subprocess.run([sys.executable, "-m", "controller.cli", "keys", "init", "--dir", str(keys)], check=True,
                   capture_output=True, env=ENV, cwd=ROOT)
    topo = Topology(tmp, tier, tmp / "registry.db", keys, v1, boards, real)
    topo.procs["controller"] = _spawn(["controller.cli", "--broker", tier.centre.url, "--db", str(topo.db),
                                       "--signing-key", str(keys / "controller.pem"), "serve"], tmp / "controller.log")
    wait_until(lambda: topo.db.exists(), 60, "the controller's registry")
    if relays:
        for s in sites:
            topo.start_relay(s)
    for s in sites:
        for b in boards[s]:
            if b in real:
                cfg = tmp / f"{b}.toml"
                cfg.write_text(f'[device]\nid = "{b}"\nsite = "{s}"\n[mqtt]\nbroker = "{tier.sites[s].url}"\n'
                               f'keepalive = 10\nmin_backoff_s = 0.2\nmax_backoff_s = 1.0\n[telemetry]\ninterval_s = 2\n'
                               f'[state]\ndir = "{tmp / b}"\n[model]\nbundle = "{v1}"\ntransfer_retry_s = 1.0\n'
                               f'[security]\ntrusted_keys = ["{keys / "controller.pub"}"]\n'
                               f'[homeassistant]\nenabled = false\n')
                topo.procs[b] = _spawn(["agent.cli", "run", "--config", str(cfg)], tmp / f"{b}.log")
    manifest = json.loads((v1 / "manifest.json").read_text())
    bundle = {"name": manifest.get("name"), "version": manifest["version"], "bundle_sha256": bundle_id(v1)}
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="sim-boards", daemon=True).start()
    topo.loop = loop
    for s in sites:
        for b in boards[s]:
            if b not in real:
                sim = SimBoard(b, s, tier.sites[s].port, bundle)
                topo.sims.append(sim)
                asyncio.run_coroutine_threadsafe(sim.start(), loop).result(30)
    for s in sites:
        for b in boards[s]:
            wait_until(lambda: (d := _device(topo.db, b)) is not None and d.online
                       and ((d.state or {}).get("model") or {}).get("version") == "1.0.0", 180, f"{b} online")
        if relays:
            wait_until(lambda: (d := _device(topo.db, f"relay-{s}")) is not None and d.online, 60,
                       f"relay-{s} online")
    return topo


def with_extra_file(src: Path, out: Path, version: str, nbytes: int) -> Path:
    from protocol.bundle import write_manifest

    shutil.copytree(src, out)
    m = json.loads((out / "manifest.json").read_text())
    (out / "notes.bin").write_bytes(os.urandom(nbytes))
    m["files"]["notes.bin"] = {"role": "other"}
    m["version"] = version
    write_manifest(out, m)
    return out


def rollout(topo: Topology, bundle: Path, timeout: float) -> tuple[float, dict[str, int], int]:
    """Deploy ``bundle`` to every board by site; (seconds, downlink PUBLISH bytes per site, patch bytes)."""
    before = topo.counts()
    t0 = time.monotonic()
    out = topo.ctl("deploy", str(bundle), "--from", str(topo.v1), "--all", "--by-site", "--soak", "0s", "--wait",
                   "--json", "--timeout", f"{int(timeout)}s", timeout=timeout + 60)
    seconds = time.monotonic() - t0
    try:
        r = json.loads(out.stdout)
    except ValueError:
        raise SystemExit(f"site_tier: the rollout failed: {out.stdout[-2000:]} {out.stderr[-2000:]}") from None
    if r["status"] != "done":
        bad = {d["device"]: (d["status"], d["reason"]) for d in r["devices"] if d["status"] != "applied"}
        raise SystemExit(f"site_tier: rollout {r['rollout_id']} ended {r['status']}: {r.get('reason')}; {bad} "
                         f"(logs in {topo.tmp})")
    after = topo.counts()
    down = {s: after[s]["down_publish_bytes"] - before[s]["down_publish_bytes"] for s in after}
    # the patch's bytes, as the boards reported them in their ``applied`` events
    from controller.registry import Registry

    reg = Registry(topo.db, readonly=True)
    try:
        sizes = [e["body"].get("bytes") or 0 for b in topo.real for e in reg.events(b, limit=200)
                 if e["event"] == "model.update" and e["body"].get("status") == "applied"
                 and e["body"].get("rollout_id") == r["rollout_id"]]
    finally:
        reg.close()
    if not sizes or not max(sizes):
        raise SystemExit("site_tier: no applied event with the patch size from a real agent")
    return seconds, down, max(sizes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="3 boards per site, a 2 MB patch (< 60 s)")
    ap.add_argument("--boards", type=int, default=None, help="boards per site (default 8; 3 with --quick)")
    ap.add_argument("--extra", type=float, default=None, help="MB of random data in the patch (default 8; 2)")
    args = ap.parse_args()
    n = args.boards or (3 if args.quick else 8)
    extra = int((args.extra or (2 if args.quick else 8)) * 1_000_000)
    tmp = Path(tempfile.mkdtemp(prefix="site-tier-"))
    t_start = time.monotonic()
    topo = build_topology(tmp, n, real_per_site=1)
    try:
        v2 = with_extra_file(topo.v1, tmp / "v2", "1.1.0", extra)
        relay_s, relay_down, patch = rollout(topo, v2, 300)
        for s in SITES:
            topo.stop_relay(s)
        v3 = with_extra_file(topo.v1, tmp / "v3", "1.2.0", extra)
        # boards on 1.1.0 now; the patch is made from 1.0.0: deploy 1.2.0 from 1.1.0's bundle instead
        topo.v1 = v2
        direct_s, direct_down, patch3 = rollout(topo, v3, 300)
        fig: dict[str, Any] = {
            "boards_per_site": n, "sites": len(SITES), "patch_bytes": patch,
            "relay_uplink_copies": round(sum(relay_down.values()) / len(relay_down) / patch, 3),
            "direct_uplink_copies": round(sum(direct_down.values()) / len(direct_down) / patch3, 3),
            "relay_uplink_copies_per_site": {s: round(v / patch, 3) for s, v in relay_down.items()},
            "direct_uplink_copies_per_site": {s: round(v / patch3, 3) for s, v in direct_down.items()},
            "rollout_s": round(relay_s, 2), "direct_rollout_s": round(direct_s, 2),
            "relay_vs_direct_time": round(relay_s / direct_s, 3) if direct_s else None,
            "real_agents": len(topo.real), "simulated_boards": len(topo.sims),
        }
        fl_path = Path(__file__).with_name("site_tier_fl.py")
        if fl_path.exists():   # sitefl19's FL figures over the same topology
            spec = importlib.util.spec_from_file_location("site_tier_fl", fl_path)
            mod = importlib.util.module_from_spec(spec)
            assert spec.loader is not None
            spec.loader.exec_module(mod)
            fig.update(mod.run(topo, args.quick))
        fig["wall_s"] = round(time.monotonic() - t_start, 1)
        fig["load"] = os.getloadavg()[0]
    except BaseException:
        topo.stop()
        raise
    topo.stop()
    shutil.rmtree(tmp, ignore_errors=True)
    for k, v in fig.items():
        print(f"{k:>30}: {v}", file=sys.stderr)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
