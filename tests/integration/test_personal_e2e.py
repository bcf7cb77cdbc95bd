"""Personalization over a real broker with real agents (issue 20): FedPer's per-board head and its
quality gate, after a real federated round. Each board fine-tunes its own last layer from the new
global head, compares it with the global one on its held-out slice, serves the better, and its
telemetry reports both accuracies and the choice (as does the ``fl.head_applied`` event)."""
from __future__ import annotations

from tests.helpers.fleet import start_fleet, stop
from tests.helpers.learning import agent_extra, ready, shards, store, wait_run
from tests.helpers.waiting import wait_for
from tests.integration.test_federated_e2e import events, start_run


def personalization(db, dev):
    from tests.helpers.fleet import device

    d = device(db, dev)
    return ((d.telemetry or {}).get("learning") or {}).get("personalization") if d and d.online else None


def test_boards_keep_a_personal_head_gated_against_the_global_one(tmp_path, mosquitto, example_bundle):
    bundle = example_bundle[0]
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        sh = shards(tmp_path, 2)                      # non-IID: each board sees mostly a few classes
        for i in range(2):
            add_agent(f"pp-{i}", extra=agent_extra(bundle, *sh[i]) + "personalize = true\npersonal_steps = 40\n")
        for i in range(2):
            ready(db, f"pp-{i}", n=60)                  # labelled samples, and a held-out slice of them
        run_id = start_run(mosquitto.url, db, bundle, "--clients", "2", "--min-clients", "2", "--rounds", "1",
                           "--deadline", "60s", "--steps", "20")
        run = wait_run(db, run_id, timeout=90)
        assert run.status == "done" and run.global_version == 1, (run.status, run.error)
        assert store(db).round(run_id, 1).metrics["received"] == 2
        for i in range(2):
            dev = f"pp-{i}"
            ev = wait_for(lambda: events(db, dev, "fl.head_applied"), timeout=60, what=f"{dev} applies the head")[-1]
            p = wait_for(lambda: (x := personalization(db, dev)) and "personal_accuracy" in x and x, timeout=60,
                         what=f"{dev}'s telemetry reporting both accuracies")
            assert 0.0 <= p["global_accuracy"] <= 1.0 and 0.0 <= p["personal_accuracy"] <= 1.0, p
            # the gate: the personal head only when strictly better on this board's holdout
            assert p["serve"] == ("personal" if p["personal_accuracy"] > p["global_accuracy"] else "global"), p
            assert ev["body"]["serving"] == p["serve"], (ev, p)
    finally:
        for p in procs:
            stop(p)
