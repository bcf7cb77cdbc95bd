"""``round start --wait`` on a real controller and agent (issue 17): while no device is eligible it
says why (here: too few labelled samples on every device), and a run that cannot start fails with
the reason printed, not only in ``round status``. Old code: silence, then 120 s, then "failed"."""
from __future__ import annotations

import subprocess
import sys
import time

from tests.helpers.fleet import ENV, ROOT, device, start_fleet, stop
from tests.helpers.waiting import wait_for


def test_round_start_wait_says_why_no_device_is_eligible(tmp_path, mosquitto, example_bundle):
    db, add_agent, procs = start_fleet(tmp_path, mosquitto.url)
    try:
        add_agent("w1")
        wait_for(lambda: (d := device(db, "w1")) and d.online and d.telemetry, timeout=30, what="w1 telemetry")
        t0 = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "controller.cli", "--db", str(db), "round", "start",
                              "--bundle", str(example_bundle[0]), "--clients", "1", "--min-samples", "1000",
                              "--start-timeout", "4s", "--wait"],
                             capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=90)
        took = time.monotonic() - t0
    finally:
        for p in procs:
            stop(p)
    assert out.returncode == 1, out.stdout + out.stderr
    waiting = [ln for ln in out.stderr.splitlines() if ln.startswith("waiting for devices:")]
    assert waiting and "0 of 1 devices needed are eligible" in waiting[0] and "w1" in waiting[0], out.stderr
    assert "labelled samples < 1000" in waiting[0], waiting
    assert len(waiting) <= 2, waiting          # bounded: once, again only when it changes or 10 s passed
    assert "failed" in out.stdout and "no round could start in 4s" in out.stdout, out.stdout
    assert took < 60, took
