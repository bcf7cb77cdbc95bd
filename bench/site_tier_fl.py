"""Federated rounds across sites: what crosses each site's uplink per round, with site aggregation vs
without, and whether the result is the flat one (issue 19).

Two runs of the same rounds on real parts: a central Mosquitto with the real controller, 2 sites,
each a Mosquitto bridged to the centre through a counting proxy (its uplink), N boards per site
speaking the real protocol (``tests.helpers.sitefl.SimBoard``: seeded deltas, so both runs send the
same updates), FedAvg.

* **site**: the bridge table as shipped (``dev/+/data/fl`` stays on the site) and the real relay role
  (``edge-agent`` with ``[relay]``, its fl component) on each site: one ``fl.site_update`` per round;
* **flat** (the baseline, same run): no relay, ``protocol.sites.rules_without_relay_fl`` — every
  board's ``fl.update`` crosses the bridge.

Counted at each proxy, site → centre: whole MQTT PUBLISH packets (fixed header, topic, properties,
payload) whose topic is an ``…/data/fl`` one — QoS 1 retransmissions included. Figures:
``fl_updates_per_site_per_round`` (goal 1), ``fl_uplink_bytes_per_site_per_round_site`` /
``…_flat`` and their ratio, ``site_vs_flat_max_abs_diff`` between the two runs' global heads (≤ 1e-6).
``run()`` is what ``bench/site_tier.py`` calls (``measure()`` with its sizes); run alone, the last line is
one JSON object. The proxies' per-connection packet counters are swapped for one that also counts
``…/data/fl`` publishes (``FlPacketCounter``) before the tiers start.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.helpers import sites as sites_mod  # noqa: E402
from tests.helpers.sites import MqttPacketCounter, SiteTier  # noqa: E402


class FlPacketCounter(MqttPacketCounter):
    """``MqttPacketCounter`` that also counts the PUBLISH packets on ``…/data/fl`` topics (and their bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fl_publishes = 0
        self.fl_bytes = 0
        self._raw = bytearray()

    def feed(self, data: bytes) -> None:
        self._raw += data
        while len(self._raw) >= 2:
            length, mult, i = 0, 1, 1
            while i < len(self._raw):
                b = self._raw[i]
                length += (b & 0x7F) * mult
                mult *= 128
                i += 1
                if not b & 0x80:
                    break
            else:
                break   # the remaining length is not all here yet
            total = i + length
            if len(self._raw) < total:
                break
            if self._raw[0] >> 4 == 3 and i + 2 <= total:
                tlen = int.from_bytes(self._raw[i:i + 2], "big")
                if bytes(self._raw[i + 2:i + 2 + tlen]).endswith(b"/data/fl"):
                    self.fl_publishes += 1
                    self.fl_bytes += total
            del self._raw[:total]
        super().feed(data)


class FlatTier(SiteTier):
    """The baseline: the same tier, but boards' federated updates cross the bridge (no relay fl)."""

    def add_site(self, name):
        from protocol.sites import BridgeSettings, bridge_config, rules_without_relay_fl
        from tests.helpers.broker import Mosquitto
        from tests.helpers.sites import CountingProxy, Site

        proxy = CountingProxy(self.centre.port).start()
        conf = bridge_config(BridgeSettings(site=name, centre=f"127.0.0.1:{proxy.port}", root=self.root,
                                            keepalive_s=5, restart_timeout=self.restart_timeout,
                                            boards=tuple(self.boards.get(name, ()))),
                             rules_without_relay_fl())
        sdir = self.workdir / f"site-{name}"
        sdir.mkdir(parents=True, exist_ok=True)
        broker = Mosquitto(sdir, extra_conf=conf).start()
        site = Site(name, broker, proxy, self.centre.port, conf)
        self.sites[name] = site
        return site


def _one(workdir: Path, bundle: Path, sites: list[str], per_site: int, rounds: int, relay: bool) -> dict:
    from controller.db import connect
    from controller.fl.store import RoundStore
    from tests.helpers.fleet import controller_online, device, fleetctl, start_controller, stop
    from tests.helpers.sitefl import SimBoard, start_relay
    from tests.helpers.waiting import wait_for

    workdir.mkdir(parents=True, exist_ok=True)
    sites_mod.MqttPacketCounter = FlPacketCounter   # each proxy connection's counter also counts data/fl
    names = {s: [f"{s}-b{j}" for j in range(per_site)] for s in sites}
    # per-board downlink rules (what bench/site_tier.py uses): a site hears only its own boards' tasks
    tier = (SiteTier if relay else FlatTier)(workdir, sites, boards=names).start()
    procs, boards = [], []
    try:
        db = workdir / "registry.db"
        procs.append(start_controller(tier.centre.url, db, workdir / "controller.log"))
        controller_online(tier.centre.port, timeout=60)
        if relay:
            for s in sites:
                procs.append(start_relay(workdir, f"relay-{s}", s, tier.sites[s].url, tier.sites[s].uplink_url))
                wait_for(lambda s=s: (d := device(db, f"relay-{s}")) and d.online, timeout=60, what=f"relay {s}")
        for si, s in enumerate(sites):
            for j, name in enumerate(names[s]):
                boards.append(SimBoard(tier.sites[s].port, name, samples=20 + 7 * j + si, seed=100 * si + j,
                                       resend_s=15.0, site=s))
        for b in boards:
            wait_for(lambda b=b: (d := device(db, b.dev)) and d.online and d.telemetry, timeout=60,
                     what=f"{b.dev} registered")
        def fl_counts() -> dict[str, tuple[int, int]]:
            """(publishes, bytes) on …/data/fl, site → centre, summed over the proxy's connections."""
            out = {}
            for s in sites:
                p = tier.sites[s].proxy
                with p._lock:
                    ups = [u for u, _ in p._counters if isinstance(u, FlPacketCounter)]
                    out[s] = (sum(u.fl_publishes for u in ups), sum(u.fl_bytes for u in ups))
            return out
        before = fl_counts()
        n = len(boards)
        t0 = time.monotonic()
        out = fleetctl("--broker", tier.centre.url, "--db", str(db), "round", "start", "--bundle", str(bundle),
                       "--no-wait", "--json", "--max-cpu", "100", "--rounds", str(rounds), "--clients", str(n),
                       "--min-clients", str(n), "--deadline", "120s", "--seed", "7")
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        run_id = json.loads(out.stdout)["run_id"]
        run = wait_for(lambda: (r := RoundStore(connect(str(db))).run(run_id)) and r.status in
                       ("done", "partial", "failed") and r, timeout=120 + 150 * rounds, what="the run")
        wall = time.monotonic() - t0
        time.sleep(1.0)   # the last acks and PUBACKs settle (counted figures are uplink, not these)
        store = RoundStore(connect(str(db)))
        after = fl_counts()
        return {"status": run.status, "head": run.head, "wall_s": wall, "boards": n,
                "received": [r.metrics.get("received") for r in store.rounds(run_id)],
                "fl_publishes": {s: after[s][0] - before[s][0] for s in sites},
                "fl_bytes": {s: after[s][1] - before[s][1] for s in sites}}
    finally:
        for b in boards:
            b.close()
        for p in procs:
            stop(p)
        tier.stop()


def measure(workdir: Path | None = None, quick: bool = False, per_site: int | None = None,
            rounds: int | None = None, sites: tuple[str, ...] = ("site-a", "site-b")) -> dict:
    """Both runs and the figures (``bench/site_tier.py`` merges them into its JSON line)."""
    from tests.helpers.bundles import example_into

    per_site = per_site or (4 if quick else 12)
    rounds = rounds or (2 if quick else 4)
    tmp = Path(workdir or tempfile.mkdtemp(prefix="site-tier-fl-"))
    bundle = example_into(tmp / "bundle" / "digits-1.0.0", size="small", seed=0, epochs=30)[0]
    site = _one(tmp / "site", bundle, list(sites), per_site, rounds, relay=True)
    flat = _one(tmp / "flat", bundle, list(sites), per_site, rounds, relay=False)
    diff = max(float(np.max(np.abs(np.asarray(site["head"][k], np.float64) - np.asarray(flat["head"][k], np.float64))))
               for k in flat["head"]) if site["status"] == flat["status"] == "done" else None
    per_round = lambda d: {s: round(v / rounds, 3) for s, v in d.items()}  # noqa: E731
    bytes_site = float(np.mean(list(site["fl_bytes"].values()))) / rounds
    bytes_flat = float(np.mean(list(flat["fl_bytes"].values()))) / rounds
    return {
        "fl_updates_per_site_per_round": round(float(np.mean(list(site["fl_publishes"].values()))) / rounds, 3),
        "fl_updates_per_site_per_round_flat": round(float(np.mean(list(flat["fl_publishes"].values()))) / rounds, 3),
        "fl_updates_per_site_per_round_by_site": per_round(site["fl_publishes"]),
        "fl_uplink_bytes_per_site_per_round_site": round(bytes_site),
        "fl_uplink_bytes_per_site_per_round_flat": round(bytes_flat),
        "fl_uplink_bytes_ratio_site_vs_flat": round(bytes_site / bytes_flat, 4) if bytes_flat else None,
        "site_vs_flat_max_abs_diff": diff,
        "fl_boards_per_site": per_site, "fl_rounds": rounds,
        "fl_run_status": {"site": site["status"], "flat": flat["status"]},
        "fl_received_per_round": {"site": site["received"], "flat": flat["received"]},
        "fl_wall_ratio_site_vs_flat": round(site["wall_s"] / flat["wall_s"], 3) if flat["wall_s"] else None,
    }


def run(topology: object = None, quick: bool = False) -> dict:
    """What ``bench/site_tier.py`` merges into its JSON line. Its topology is not reused: its simulated
    boards speak the update protocol only, and FL needs two tiers of its own (site and flat) that see
    the same seeded updates; so this builds its own, smaller under ``--quick`` (3 boards, 1 round)."""
    return measure(quick=quick, per_site=3 if quick else None, rounds=1 if quick else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 boards per site, 2 rounds (< 60 s)")
    ap.add_argument("--boards", type=int, default=None, help="boards per site")
    ap.add_argument("--rounds", type=int, default=None)
    a = ap.parse_args()
    t0 = time.time()
    res = measure(quick=a.quick, per_site=a.boards, rounds=a.rounds)
    res["load_1m"] = round(os.getloadavg()[0], 2)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
