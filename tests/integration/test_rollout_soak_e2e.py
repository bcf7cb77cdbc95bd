"""The soak and the fleet confidence gate on real agents (issue 17): the canary soaks on the new
version, the gate judges the live confidence the devices report over it, and the next wave never
starts when the fleet got less sure. Old code: ``conf_after`` stayed null and wave 2 started ~0.5 s
after "applied"."""
from __future__ import annotations

import json

import numpy as np

from controller.rollouts.store import RolloutStore
from tests.helpers.fleet import device
from tests.helpers.waiting import wait_for
from tests.integration.test_rollout_e2e import model_of, signed_fleet, variant  # noqa: F401 - fixture

SOAK_S = 4.0


def test_soak_gathers_live_confidence_and_the_gate_holds_the_next_wave(signed_fleet, tmp_path, example_bundle):
    from controller.modeltools.example import digits_split

    db, add_agent, ctl, _ = signed_fleet
    v1 = example_bundle[0]
    # same argmax (passes each board's own health gate), a flatter softmax: the fleet is less sure
    soft = variant(v1, tmp_path / "soft", "1.1.0", lambda h: {k: v * 0.25 for k, v in h.items()})
    xtr, _, _, _ = digits_split(0)
    np.save(tmp_path / "live.npy", xtr[:200].astype(np.float32))
    for d in ("k1", "k2"):
        add_agent(d, v1, extra=f'[inference]\nsource = "replay"\nreplay_x = "{tmp_path / "live.npy"}"\nrate_hz = 100\n')
    for d in ("k1", "k2"):
        wait_for(lambda: ((x := device(db, d)) and ((x.telemetry or {}).get("model") or {}).get("inferences", 0) >= 40),
                 timeout=40, what=f"{d} serving live inferences")
    out = ctl("deploy", str(soft), "--from", str(v1), "--to", "k1,k2", "--canary", "50%", "--soak", f"{SOAK_S:g}s",
              "--max-confidence-drop", "0.05", "--wait", "--json", "--timeout", "90s")
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["status"] == "aborted" and "fleet confidence fell" in r["reason"], r
    canary, rest = r["devices"]
    assert canary["wave"] == 0 and canary["conf_before"] is not None and canary["conf_after"] is not None, canary
    assert canary["conf_before"] - canary["conf_after"] > 0.05, canary
    assert rest["status"] == "skipped", rest                     # wave 2 was never released
    assert r["figures"]["fleet"]["inferences"] >= 20, r["figures"]
    # the gate decided on telemetry gathered after the switch, not at "applied"
    st = RolloutStore.open(str(db))
    assert st.slot(r["rollout_id"], rest["device"]).offered is None
    wait_for(lambda: model_of(db, canary["device"]).get("version") == "1.0.0", timeout=40,
             what="the canary sent back to 1.0.0")
