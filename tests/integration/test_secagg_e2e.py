"""Secure aggregation over a real Mosquitto with real agents: two rounds where the controller
only ever holds masked vectors and their sum, and a replayed mask refused with its reason."""
from __future__ import annotations

import numpy as np
import pytest

from protocol.binary import decode_frame, encode_frame, is_frame
from protocol import secagg_wire  # noqa: F401 - registers fl.secagg
from protocol.envelope import Envelope
from tests.helpers.fleet import start_fleet, stop
from tests.helpers.learning import agent_extra, ready, shards, store, wait_run
from tests.helpers.waiting import Probe, wait_for
from tests.integration.test_federated_e2e import events, start_run

pytest.importorskip("Crypto.Protocol.SecretSharing")


def test_two_secure_rounds_and_a_replayed_mask(tmp_path, mosquitto, example_bundle):
    bundle = example_bundle[0]
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    spy = Probe(mosquitto.port, subscribe=("edgefleet/v1/dev/+/data/fl",), client_id="spy").wait_subscribed()

    def frames():
        return [(t, dict(f.envelope.body), dict(f.tensors))
                for t, p, _ in spy.seen() if is_frame(p) for f in [decode_frame(p)]]

    try:
        sh = shards(tmp_path, 3)
        for i in range(3):
            add_agent(f"sa-{i}", extra=agent_extra(bundle, *sh[i]))
        for i in range(3):
            ready(db, f"sa-{i}")
        run_id = start_run(mosquitto.url, db, bundle, "--clients", "3", "--min-clients", "2", "--rounds", "2",
                           "--deadline", "30s", "--steps", "10", "--secagg", "max_dropout=0.34",
                           "--secagg", "stage_s=10")
        run = wait_run(db, run_id, timeout=120)
        seen = frames()
        assert run.status == "done" and run.global_version == 2, run.error
        for r in (1, 2):
            rows = store(db).updates(run_id, r)
            assert [u.device_id for u in rows] == ["secagg"]           # never an individual update
            m = store(db).round(run_id, r).metrics
            assert m["secagg_clients"] >= 2 and m["secagg_bytes"] > 0, m
        assert all(b.get("stage") in ("advertise", "shares", "masked", "reveal") for _, b, _ in seen)
        assert not any(b.get("encoding") for _, b, _ in seen)          # no fl.update on the wire at all
        _, body, tensors = next((t, b, x) for t, b, x in seen if b.get("stage") == "masked" and b["client"] == "sa-0")
        y = tensors["y"].view(np.uint64)
        assert 0.3 < float(np.mean(y >> np.uint64(63))) < 0.7          # uniform words, not an update
        replay = Envelope(kind="fl.secagg", sender="sa-0", body={**body, "session": f"{run_id}#2"})
        spy.publish("edgefleet/v1/dev/sa-0/data/fl", encode_frame(replay, {"y": tensors["y"]}))
        # the session is over: the replay is refused with the reason, back on sa-0's command topic
        wait_for(lambda: events(db, "sa-0", "fl.secagg_refused"), timeout=30, what="the replay refused")
        assert "no secure session" in events(db, "sa-0", "fl.secagg_refused")[-1]["body"]["reason"]
        for i in range(3):
            assert events(db, f"sa-{i}", "fl.head_applied")
    finally:
        spy.close()
        for p in procs:
            stop(p)
