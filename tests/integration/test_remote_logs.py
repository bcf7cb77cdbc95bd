"""``fleetctl logs``: a board's history from its ring, and ``--follow`` streaming live records."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers.fleet import ENV, ROOT, agent_config, fleetctl, start_agent, stop
from tests.helpers.waiting import wait_for


def test_logs_history_level_and_follow(mosquitto, tmp_path):
    agent = start_agent(agent_config(tmp_path, "pi-log", mosquitto.url, interval=5), tmp_path / "pi-log.log")
    try:
        r = wait_for(lambda: (x := fleetctl("--broker", mosquitto.url, "logs", "pi-log")).returncode == 0 and x, 30,
                     interval=0.3, what="agent answering")
        assert "connected to" in r.stdout, r.stdout + r.stderr
        assert fleetctl("--broker", mosquitto.url, "cmd", "pi-log", "no-such-cmd").returncode != 0
        follow = subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", mosquitto.url, "logs", "pi-log",
                                   "--follow", "--level", "warning", "--since", "10m", "--seconds", "60"],
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
        lines: list[str] = []

        def read_until(text: str) -> bool:
            while True:
                line = follow.stdout.readline()
                if not line:
                    lines.append(follow.stderr.read())
                    return False
                lines.append(line)
                if text in line:
                    return True

        assert read_until("no-such-cmd"), "".join(lines)    # the history first, warnings only
        assert not any("connected to" in x for x in lines), lines
        # then live: a new warning after the follow started arrives on the stream
        wait_for(lambda: fleetctl("--broker", mosquitto.url, "cmd", "pi-log", "live-marker").returncode != 0, 20,
                 what="marker command sent")
        assert read_until("live-marker"), "".join(lines)
        follow.terminate()
        follow.wait(10)
        assert "rejected" not in follow.stderr.read()
    finally:
        stop(agent)
