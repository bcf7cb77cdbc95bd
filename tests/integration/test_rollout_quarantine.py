"""A refused (tampered) artifact is quarantined, never offered again, and does not block the genuine
version: real controller, real agents, real Mosquitto (issue 15, item 4)."""
from __future__ import annotations

import json

from tests.helpers.waiting import wait_for
from tests.integration.test_rollout_e2e import events, model_of, signed_fleet, variant  # noqa: F401 - signed_fleet is a fixture


def test_a_tampered_patch_is_quarantined_and_the_genuine_version_still_deploys(signed_fleet, tmp_path,
                                                                               example_bundle):
    from protocol.patch import make_patch
    from protocol.signing import load_private

    db, add_agent, ctl, keys = signed_fleet
    v1 = example_bundle[0]
    v2 = variant(v1, tmp_path / "v2", "1.1.0", lambda h: {k: v * 1.01 for k, v in h.items()})
    key = load_private(keys / "controller.pem")
    genuine, _ = make_patch(v1, v2, key)
    bad = bytearray(genuine)
    bad[-3] ^= 0xFF                      # the payload no longer matches its signed hash
    (tmp_path / "tampered.efp").write_bytes(bytes(bad))
    (tmp_path / "genuine.efp").write_bytes(make_patch(v1, v2, key)[0])
    for d in ("q1", "q2"):
        add_agent(d, v1)
    for d in ("q1", "q2"):
        wait_for(lambda: model_of(db, d).get("version") == "1.0.0", timeout=30, what=f"{d} on 1.0.0")

    # 1. the tampered A->B patch: refused by the board, the rollout fails, the artifact is quarantined
    out = ctl("deploy", str(tmp_path / "tampered.efp"), "--to", "q1", "--canary", "0", "--wait", "--json",
              "--timeout", "60s")
    assert out.returncode == 1, out.stdout + out.stderr
    r = json.loads(out.stdout)
    assert r["devices"][0]["status"] == "failed" and "payload hash" in r["devices"][0]["reason"], r
    tampered_id = r["selector"]["artifact"]
    st = wait_for(lambda: (s := json.loads(ctl("rollout", "status", r["rollout_id"], "--json").stdout))
                  ["artifact"]["quarantined"] and s, timeout=20, what="the tampered artifact quarantined")
    assert st["artifact"]["id"] == tampered_id and "payload hash" in st["artifact"]["quarantine_reason"]
    assert [a["id"] for a in st["quarantined"]] == [tampered_id]
    assert "quarantined" in ctl("rollout", "status", r["rollout_id"]).stdout
    assert model_of(db, "q1")["version"] == "1.0.0"

    # 2. the genuine B as a bundle (the controller makes the A->B patch): it is not the quarantined one
    out = ctl("deploy", str(v2), "--from", str(v1), "--to", "q1", "--canary", "0", "--wait", "--json",
              "--timeout", "60s")
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["devices"][0]["status"] == "applied"
    wait_for(lambda: model_of(db, "q1").get("version") == "1.1.0", timeout=30, what="q1 on 1.1.0")

    # 3. the genuine A->B patch file (other bytes, same versions): the rollout ships its own artifact
    out = ctl("deploy", str(tmp_path / "genuine.efp"), "--to", "q2", "--canary", "0", "--wait", "--json",
              "--timeout", "60s")
    assert out.returncode == 0, out.stdout + out.stderr
    wait_for(lambda: model_of(db, "q2").get("version") == "1.1.0", timeout=30, what="q2 on 1.1.0")
    tids = {e.get("transfer_id") for d in ("q1", "q2") for e in events(db, d, "downloading")}
    assert tampered_id[:32] in tids and len(tids) == 3      # three offers, three different artifacts

    # 4. the quarantined artifact cannot be deployed again
    again = ctl("deploy", str(tmp_path / "tampered.efp"), "--to", "q2", "--canary", "0")
    assert again.returncode == 1 and "quarantined" in again.stderr, again.stdout + again.stderr
