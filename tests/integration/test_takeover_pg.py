"""Lease takeover where it matters (issue 14 item 4): real `fleetctl serve --replica` processes on a
real PostgreSQL registry and a real Mosquitto, the owner SIGKILLed at EVERY step boundary.

The kill loop is a chain, so that one run crosses every boundary once: replica ``r{k}`` runs with
``EDGEFLEET_FAILPOINT = STEPS[k]`` and kills itself there; ``r{k+1}`` (the next step's failpoint) is
already up as the standby, takes the lease over when it expires, carries the work on from what the
store committed, and dies at its own step; the last replica has no failpoint and finishes. For each
step the test measures the takeover (from the owner's death, or the standby's start when that came
later, to the lease naming the standby) and asserts a bound that holds on a loaded 2-core machine.

What is counted on the wire (a probe subscriber on every device topic):

* no update lost: every device's update of every round is recorded once, accepted, and aggregated;
* no task trained twice: each device trains each round once; a task is on the wire more than once
  only where the dead owner had handed it to the broker and the store did not yet say "sent" (a
  kill at ``fl.task.published`` / ``acked`` / ``marked``, for that device's task or the other's
  still unmarked one): the new owner cannot know whether the broker got it and sends it again, and
  the device dedupes it by (run, round). A round after the last kill has exactly one task per device;
* rollouts: no chunk served twice — each (transfer, chunk) is on the wire once per time the device
  asked for it, and an agent never asks again for a chunk it holds.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from controller.fl.runner import FAILPOINTS
from protocol.binary import decode_frame, is_frame
from tests.helpers.broker import Mosquitto
from tests.helpers.fleet import ENV, ROOT, device, fleetctl, stop
from tests.helpers.waiting import Probe, wait_for
from tests.integration.test_rounds_faults_e2e import FakeDevice

TTL = 3.0
#: a takeover is the lease's TTL plus a tick; this bound holds on a loaded 2-core machine
TAKEOVER_BOUND_S = TTL + 12.0
BASE = "edgefleet/v1"
#: the round step after whose kill the broker is restarted too, before the standby takes over
RESTART_BROKER_AT = "fl.update.received"
#: a step is skipped in a round when it is not needed there (an update that arrives before the new
#: owner re-sent its task marks the task sent), so the chain's steps can spread over a few rounds;
#: the rounds after the last kill show the steady state (exactly one task per device)
ROUNDS = 4


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    b = Mosquitto(tmp_path_factory.mktemp("broker"), persistence=True).start()
    yield b
    b.stop()


def start_replica(tmp, url, registry, name, failpoint=None, controller="", extra=""):
    """``fleetctl serve`` as replica ``name`` (``controller``: more [controller] keys; ``extra``: more sections)."""
    cfg = tmp / f"{name}.toml"
    cfg.write_text(f'[controller]\nreplica = "{name}"\nlease_ttl_s = {TTL}\n{controller}[mqtt]\nbroker = "{url}"\n'
                   f'[registry]\nurl = "{registry}"\nartifacts_dir = "{tmp / "artifacts"}"\n{extra}')
    env = {**ENV, **({"EDGEFLEET_FAILPOINT": failpoint} if failpoint else {})}
    log = tmp / f"{name}.log"
    p = subprocess.Popen([sys.executable, "-m", "controller.cli", "--config", str(cfg), "serve"],
                         stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return p, log


class Replicas:
    """The chain of replicas: their processes and logs, when each came online (its retained state,
    seen by a probe) and when each died (a thread per process), and every change of owner of the
    leases (a thread reading the lease table every 0.1 s) — so the takeover times are measured from
    the events themselves, not from when the test's loop got round to looking."""

    def __init__(self, tmp, broker, registry, controller="", extra=""):
        self.tmp, self.broker, self.registry = tmp, broker, registry
        self.controller, self.extra = controller, extra
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, object] = {}
        self.died: dict[str, float] = {}
        self.online: dict[str, float] = {}
        self.owners: dict[str, list[tuple[float, str]]] = {}     # lease -> [(when, new owner)]
        self._stop = threading.Event()
        self._onl = threading.Lock()
        self.watch_errors: list[str] = []
        self.probe = Probe(broker.port, subscribe=(f"{BASE}/ctl/state/+",)).wait_subscribed()
        self.probe.client.message_callback_add(f"{BASE}/ctl/state/+", self._on_state)
        self._leases = threading.Thread(target=self._watch_leases, daemon=True)
        self._leases.start()

    def _on_state(self, client, userdata, m):
        self.probe._on_message(client, userdata, m)
        if b'"online"' in m.payload:
            with self._onl:
                self.online.setdefault(m.topic.rsplit("/", 1)[1], time.monotonic())

    def _watch_leases(self):
        from controller.db import connect

        while not self._stop.wait(0.1):
            try:
                db = connect(self.registry, readonly=True)      # fresh: no snapshot, no lock held between reads
                try:
                    rows = [tuple(r) for r in db.execute("SELECT name, owner FROM leases").fetchall()]
                finally:
                    db.close()
            except Exception as exc:  # noqa: BLE001 - the table appears with the first replica
                self.watch_errors.append(repr(exc))
                continue
            now = time.monotonic()
            for name, owner in rows:
                log = self.owners.setdefault(name, [])
                if not log or log[-1][1] != owner:
                    log.append((now, owner))

    def start(self, name, failpoint=None):
        self.procs[name], self.logs[name] = start_replica(self.tmp, self.broker.url, self.registry, name, failpoint,
                                                          self.controller, self.extra)
        p = self.procs[name]
        threading.Thread(target=lambda: (p.wait(), self.died.setdefault(name, time.monotonic())),
                         daemon=True).start()

    def online_at(self, name, timeout=60.0) -> float:
        """Block until replica ``name`` published its online state; when (monotonic) it was seen."""
        topic = f"{BASE}/ctl/state/{name}"
        self.probe.wait(lambda t, p: t == topic and b'"online"' in p, timeout=timeout, what=f"{name} online")
        with self._onl:
            return self.online.setdefault(name, time.monotonic())

    def takeover_s(self, dead, nxt, leases, timeout=20.0) -> tuple[float, bool]:
        """(seconds from ``dead``'s death — or ``nxt``'s start when that came later — to the first of
        ``leases`` naming ``nxt``; whether ``nxt`` was up before the death). 0 when ``nxt`` held it
        already: the dead one had stalled past its TTL (a loaded machine) and lost it before dying."""
        def first():
            seen = [w for name in leases for w, o in self.owners.get(name, []) if o == f"controller-{nxt}"]
            return min(seen) if seen else None
        t = wait_for(first, timeout=timeout, what=f"the lease watcher seeing {nxt} own {leases} "
                                                   f"(errors: {self.watch_errors[-2:]})")
        died, up = self.died[dead], self.online[nxt]
        return max(0.0, t - max(died, up)), up <= died

    def tail(self, name, n=3000) -> str:
        return self.logs[name].read_text()[-n:]

    def close(self):
        self._stop.set()
        self.probe.close()
        for p in self.procs.values():
            stop(p)


def lease(registry, name):
    from controller.db import connect

    db = connect(registry, readonly=True)
    try:
        if not db.has_table("leases"):
            return None
        row = db.execute("SELECT owner, epoch FROM leases WHERE name=?", (name,)).fetchone()
        return None if row is None else (row[0], int(row[1]))
    finally:
        db.close()


def round_store(registry):
    from controller.db import connect
    from controller.fl.store import RoundStore

    return RoundStore(connect(registry))


def register(broker, registry, devs, timeout=60.0):
    """Wait until the registry has each fake device online with telemetry. A replica announces
    itself online just before its shared subscriptions are confirmed, and a fake device sends its
    telemetry once, at connect: it is sent again here (as an agent does every interval) until stored."""
    from protocol.envelope import Envelope, encode

    pub = Probe(broker.port)
    deadline = time.monotonic() + timeout
    try:
        while True:
            missing = [d.dev for d in devs if not ((x := device(registry, d.dev)) and x.online and x.telemetry)]
            if not missing:
                return
            assert time.monotonic() < deadline, f"devices {missing} not registered with telemetry in {timeout}s"
            for dev in missing:
                tel = Envelope(kind="telemetry", sender=dev, body={"seq": int(time.time() * 1000), "interval_s": 1,
                                                                   "cpu_percent": 1.0,
                                                                   "learning": {"labelled_samples": 500}})
                pub.publish(f"{BASE}/dev/{dev}/telemetry", encode(tel))
            time.sleep(0.5)   # the writer thread's commit, then look again (an event wait on another process's DB)
    finally:
        pub.close()


def tasks_on_wire(probe) -> Counter:
    """(device, round) -> how many fl.task frames the broker delivered for it."""
    out: Counter = Counter()
    for topic, payload, _ in probe.seen(lambda t, p: t.endswith("/bin") and is_frame(p)):
        f = decode_frame(payload)
        if f.envelope.kind == "fl.task":
            out[(topic.split("/")[3], int(f.envelope.body["round"]))] += 1
    return out


@pytest.mark.timeout(400)
def test_round_owner_killed_at_every_step_boundary_is_taken_over(tmp_path, broker, postgres_server,
                                                                  example_bundle):
    """A chain over all of controller/fl/runner.py's FAILPOINTS on PostgreSQL: each kill is taken
    over within the bound, the run ends done, nothing lost, each device trains each round once."""
    registry = postgres_server.create_database("takeover_fl")
    steps = list(FAILPOINTS)
    names = [f"f{k}" for k in range(len(steps) + 1)]      # f{len} has no failpoint: it finishes
    reps = Replicas(tmp_path, broker, registry)
    wire = Probe(broker.port, subscribe=(f"{BASE}/dev/+/bin", f"{BASE}/dev/+/cmd")).wait_subscribed()
    devs: list[FakeDevice] = []
    takeovers: list[tuple[str, float]] = []
    try:
        reps.start(names[0], steps[0])
        reps.online_at(names[0])
        devs = [FakeDevice(broker.port, f"tk-{i}") for i in range(2)]
        register(broker, registry, devs)
        out = fleetctl("--broker", broker.url, "--registry", registry, "round", "start", "--bundle",
                       str(example_bundle[0]), "--no-wait", "--json", "--max-cpu", "100", "--clients", "2",
                       "--min-clients", "2", "--rounds", str(ROUNDS), "--deadline", "120s", "--steps", "5", timeout=60)
        assert out.returncode == 0, out.stderr
        run_id = json.loads(out.stdout)["run_id"]
        lname = f"fl:{run_id}"
        reps.start(names[1], steps[1])
        reps.online_at(names[1])
        rs = round_store(registry)

        def run_now():
            r = rs.run(run_id)
            rs.db.commit()     # no transaction left open: a starting replica's migrations must not wait on it
            return r
        last_kill_round = 0
        for k, step in enumerate(steps):
            owner, nxt = names[k], names[k + 1]
            wait_for(lambda: reps.procs[owner].poll() is not None or run_now().status != "running",
                     timeout=120, what=f"{owner} to reach {step}")
            rc = reps.procs[owner].wait(30)
            assert rc == -9, f"{owner} did not die at {step} (run {run_now().status}): {reps.tail(owner)}"
            last_kill_round = run_now().round_no
            if step == RESTART_BROKER_AT:
                # systemctl restart mosquitto during the takeover: every client drops; persistence keeps
                # the sessions and their queued QoS 1 messages (the lease is in the database: the standby
                # may take it over while the broker is down, and carries on once it is back)
                broker.stop()
                broker.start()
            # a run that ended at this kill (its last round closed) has nothing to take over: the
            # rollouts lease, which every replica takes, marks the standby's takeover then
            def took_over():
                if (x := lease(registry, lname)) and x[0] == f"controller-{nxt}":
                    return (lname,)
                if run_now().status != "running" and (x := lease(registry, "rollouts")) and x[0] == f"controller-{nxt}":
                    return ("rollouts",)
                return None
            which = wait_for(took_over, timeout=TAKEOVER_BOUND_S + 60,
                             what=f"{nxt} taking over after the kill at {step}")
            wait_for(lambda: reps.died.get(owner), timeout=30, what=f"{owner}'s death recorded")
            took, ready = reps.takeover_s(owner, nxt, which)
            takeovers.append((step + ("" if ready else " (standby up after the kill)"), took))
            if k + 2 < len(names):
                reps.start(names[k + 2], steps[k + 2] if k + 2 < len(steps) else None)
                reps.online_at(names[k + 2])
        print("takeover seconds per step:", {s: round(t, 2) for s, t in takeovers}, "last kill in round",
              last_kill_round)
        assert all(t <= TAKEOVER_BOUND_S for _, t in takeovers), takeovers
        run = wait_for(lambda: (r := run_now()) and r.status in ("done", "failed", "partial") and r,
                       timeout=120, what="the run to end")
        assert run.status == "done" and run.global_version == ROUNDS, (run.status, run.error, reps.tail(names[-1]))
        # one owner change per kill (the epoch counts them); the last owner is the chain's end, or the
        # one before when the run ended at the last kill
        final = lease(registry, lname)
        assert final in ((f"controller-{names[-1]}", len(steps) + 1), (f"controller-{names[-2]}", len(steps))), final
        for r in range(1, ROUNDS + 1):
            rnd = rs.round(run_id, r)
            assert rnd.status == "aggregated" and sorted(rnd.tasks_sent) == ["tk-0", "tk-1"], rnd
            ups = rs.updates(run_id, r)
            # no update lost, none recorded twice
            assert sorted(u.device_id for u in ups) == ["tk-0", "tk-1"] and all(u.accepted for u in ups), ups
        # the probe misses what came while the broker was down (it may only undercount); the devices'
        # persistent sessions get everything: both are bounded. Only a kill while a task is between
        # its publish and its "sent" mark may put it on the wire again: the kills at the task steps
        # (one device's task at that step, the other's maybe still unmarked), at most once per device
        # each; the rounds after the last kill have exactly one task per device
        wire_tasks = tasks_on_wire(wire)
        window_kills = sum(1 for s in steps if s in ("fl.task.published", "fl.task.acked", "fl.task.marked"))
        extra = 0
        for d in devs:
            assert d.trained() == sorted(f"{run_id}#{r}" for r in range(1, ROUNDS + 1))   # each round once
            got = Counter(int(t["round"]) for t in d.tasks)
            for r in range(1, ROUNDS + 1):
                assert got[r] >= 1 and wire_tasks[(d.dev, r)] <= got[r], (d.dev, r, got, wire_tasks)
                if r > last_kill_round:
                    assert got[r] == 1, (d.dev, r, got)
                extra += got[r] - 1
            wait_for(lambda d=d: {(a["round"], a["accepted"]) for a in d.acks} == {(r, True) for r in range(1, ROUNDS + 1)},
                     timeout=60, what=f"{d.dev}: every update acknowledged")
        assert extra <= window_kills * len(devs), (extra, window_kills)
    finally:
        for d in devs:
            d.close()
        wire.close()
        reps.close()


def chunks_on_wire(probe) -> Counter:
    """(transfer, chunk index) -> how many xfer.chunk frames the broker delivered."""
    out: Counter = Counter()
    for _, payload, _ in probe.seen(lambda t, p: t.endswith("/bin") and is_frame(p)):
        f = decode_frame(payload)
        if f.envelope.kind == "xfer.chunk":
            out[(f.envelope.body["transfer_id"], int(f.envelope.body["index"]))] += 1
    return out


@pytest.mark.timeout(400)
def wire_log(probe) -> list[str]:
    """The transfer as the broker delivered it, in order: wants (asked chunks), chunks, offers."""
    from protocol.envelope import decode

    out = []
    for topic, payload, _ in probe.seen():
        if is_frame(payload):
            f = decode_frame(payload)
            if f.envelope.kind == "xfer.chunk":
                out.append(f"c{f.envelope.body['index']}")
        elif "/data/" in topic:
            env = decode(payload)
            if env.kind == "xfer.want":
                out.append(f"want{env.body['chunks']}")
        elif topic.endswith("/cmd") and b"model.offer" in payload:
            out.append("offer")
    return out


def test_rollout_owner_killed_at_every_step_boundary_is_taken_over(tmp_path, broker, postgres_server,
                                                                    example_bundle):
    """A chain over controller/rollouts/runner.py's FAILPOINTS on PostgreSQL, one real agent and a
    many-chunk, paced transfer: each kill is taken over within the bound, the agent ends on the new
    version, the rollout done, and no chunk is on the wire twice."""
    from controller.rollouts.runner import FAILPOINTS as RO_STEPS
    from tests.helpers.fleet import agent_config, start_agent
    from tests.integration.test_rollout_e2e import with_extra_file

    registry = postgres_server.create_database("takeover_ro")
    keys = tmp_path / "keys"
    assert fleetctl("keys", "init", "--dir", str(keys)).returncode == 0
    v1 = example_bundle[0]
    v2 = with_extra_file(v1, tmp_path / "v2", "2.0.0", 1_000_000)     # 16+ chunks of 64 KiB
    steps = list(RO_STEPS)
    names = [f"o{k}" for k in range(len(steps) + 1)]
    # paced, so that the transfer spans a kill; signed, as every rollout is
    reps = Replicas(tmp_path, broker, registry, controller="rollout_max_bytes_per_s = 250000\n",
                    extra=f'[security]\nsigning_key = "{keys / "controller.pem"}"\n')
    launch = reps.start
    wire = Probe(broker.port, subscribe=(f"{BASE}/dev/+/bin", f"{BASE}/dev/+/data/#",
                                         f"{BASE}/dev/+/cmd")).wait_subscribed()
    agent = None
    takeovers: list[tuple[str, float]] = []

    def model_of(dev):
        d = device(registry, dev)
        return ((d.state or {}).get("model") or {}) if d and d.online else {}

    try:
        launch(names[0], steps[0])
        reps.online_at(names[0])
        wait_for(lambda: (x := lease(registry, "rollouts")) and x[0] == f"controller-{names[0]}", timeout=60,
                 what="the rollouts lease taken")
        cfg = agent_config(tmp_path, "ra-1", broker.url, interval=0.5,
                           extra=f'[model]\nbundle = "{v1}"\ntransfer_retry_s = 1.0\n'
                                 f'[security]\ntrusted_keys = ["{keys / "controller.pub"}"]\n')
        agent = start_agent(cfg, tmp_path / "ra-1.log")
        wait_for(lambda: model_of("ra-1").get("version") == "1.0.0", timeout=60, what="ra-1 on 1.0.0")
        launch(names[1], steps[1])
        reps.online_at(names[1])
        out = fleetctl("--config", str(tmp_path / f"{names[1]}.toml"), "deploy", str(v2), "--to", "ra-1",
                       "--canary", "0", "--json", timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        for k, step in enumerate(steps):
            owner, nxt = names[k], names[k + 1]
            rc = reps.procs[owner].wait(120)
            assert rc == -9, f"{owner} did not die at {step}: {reps.tail(owner)}"
            wait_for(lambda: (x := lease(registry, "rollouts")) and x[0] == f"controller-{nxt}",
                     timeout=TAKEOVER_BOUND_S + 60, what=f"{nxt} taking over after the kill at {step}")
            wait_for(lambda: reps.died.get(owner), timeout=30, what=f"{owner}'s death recorded")
            took, ready = reps.takeover_s(owner, nxt, ("rollouts",))
            takeovers.append((step + ("" if ready else " (standby up after the kill)"), took))
            if k + 2 < len(names):
                launch(names[k + 2], steps[k + 2] if k + 2 < len(steps) else None)
                reps.online_at(names[k + 2])
        print("rollout takeover seconds per step:", {s: round(t, 2) for s, t in takeovers})
        assert all(t <= TAKEOVER_BOUND_S for _, t in takeovers), takeovers
        wait_for(lambda: model_of("ra-1").get("version") == "2.0.0", timeout=90, what="ra-1 on 2.0.0")
        st = wait_for(lambda: (j := json.loads(fleetctl("--config", str(tmp_path / f"{names[-1]}.toml"), "rollout",
                                                         "status", "--json").stdout)) and j["status"] == "done" and j,
                      timeout=60, what="the rollout done")
        assert [d["device"] for d in st["devices"]] == ["ra-1"], st
        assert lease(registry, "rollouts") == (f"controller-{names[-1]}", len(steps) + 1)
        chunks = chunks_on_wire(wire)
        assert chunks, "no chunk on the wire"
        n = max(i for _, i in chunks) + 1
        assert len({t for t, _ in chunks}) == 1 and n >= 8, chunks
        twice = {k: c for k, c in chunks.items() if c != 1}
        assert not twice, f"chunks served more than once (or never): {twice} of {n}; wire: {wire_log(wire)}"
        assert sorted(i for _, i in chunks) == list(range(n))
        assert agent.poll() is None
    finally:
        if agent is not None:
            stop(agent)
        wire.close()
        reps.close()


@pytest.mark.timeout(300)
def test_a_deploy_run_whose_owner_dies_as_it_closes_the_last_round_is_deployed_by_the_next(
        tmp_path, broker, postgres_server, example_bundle):
    """``round start --deploy``: the owner SIGKILLed right after the last round closed (the run is
    ``done`` in the store, the head not yet made a bundle nor rolled out). The run is no longer
    running, so no tick of the standby looked at it: the deploy was lost. Now the standby finds the
    done, undeployed run and deploys it, once."""
    registry = postgres_server.create_database("takeover_dep")
    keys = tmp_path / "keys"
    assert fleetctl("keys", "init", "--dir", str(keys)).returncode == 0
    reps = Replicas(tmp_path, broker, registry, extra=f'[security]\nsigning_key = "{keys / "controller.pem"}"\n')
    devs: list[FakeDevice] = []
    try:
        reps.start("d0", "fl.round.closed")
        reps.online_at("d0")
        devs = [FakeDevice(broker.port, f"dp-{i}") for i in range(2)]
        register(broker, registry, devs)
        out = fleetctl("--config", str(tmp_path / "d0.toml"), "round", "start", "--bundle", str(example_bundle[0]),
                       "--no-wait", "--json", "--max-cpu", "100", "--clients", "2", "--min-clients", "2",
                       "--rounds", "1", "--deadline", "120s", "--steps", "5", "--deploy", timeout=60)
        assert out.returncode == 0, out.stderr
        run_id = json.loads(out.stdout)["run_id"]
        wait_for(lambda: lease(registry, f"fl:{run_id}"), timeout=60, what="the run's lease taken")
        assert lease(registry, f"fl:{run_id}")[0] == "controller-d0"
        reps.start("d1")            # the standby: up once d0 owns the run
        assert reps.procs["d0"].wait(120) == -9, reps.tail("d0")
        rs = round_store(registry)

        def deployed():
            r = rs.run(run_id)
            rs.db.commit()
            return r is not None and r.status == "done" and (r.config.get("deploy") or {}).get("rollout_id") and r
        run = wait_for(deployed, timeout=TAKEOVER_BOUND_S + 30, interval=0.2, what="the done run deployed by d1")
        assert run.config["deploy"]["rollout_id"] == f"fl-{run_id[4:]}" and "error" not in run.config["deploy"]
        assert "done but not deployed" in reps.tail("d1", 20000)
        # the derived bundle is stored once, as the rollouts' artifact
        from controller.db import connect

        db = connect(registry, readonly=True)
        try:
            versions = [r[0] for r in db.execute("SELECT version FROM artifacts WHERE kind='bundle'")]
        finally:
            db.close()
        assert versions.count(f"1.0.0+fl.{run_id[-4:]}.1") == 1, versions
    finally:
        for d in devs:
            d.close()
        reps.close()
