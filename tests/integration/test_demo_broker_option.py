"""``fleetctl demo --broker URL``, the spelling README and docs/cli.md use, as well as the global one."""
from __future__ import annotations

import json

from click.testing import CliRunner

from controller.cli import app as app_mod
from tests.helpers.fleet import fleetctl


def _captured(monkeypatch) -> list[dict]:
    seen: list[dict] = []

    def fake_run_demo(**kw):
        seen.append(kw)
        return 0

    monkeypatch.setattr("controller.cli.demo.run_demo", fake_run_demo)
    return seen


def test_demo_takes_broker_after_the_command_and_before_it(monkeypatch):
    seen = _captured(monkeypatch)
    runner = CliRunner()
    after = runner.invoke(app_mod.cli, ["demo", "--broker", "mqtt://127.0.0.1:1999", "--duration", "2"])
    assert after.exit_code == 0, after.output
    before = runner.invoke(app_mod.cli, ["--broker", "mqtt://127.0.0.1:1998", "demo"])
    assert before.exit_code == 0, before.output
    both = runner.invoke(app_mod.cli, ["--broker", "mqtt://127.0.0.1:1998", "demo", "--broker",
                                       "mqtt://127.0.0.1:1997"])
    assert both.exit_code == 0, both.output
    assert [s["broker"] for s in seen] == ["mqtt://127.0.0.1:1999", "mqtt://127.0.0.1:1998",
                                           "mqtt://127.0.0.1:1997"]   # the command's own option wins
    bad = runner.invoke(app_mod.cli, ["demo", "--broker", "http://x"])
    assert bad.exit_code == 2 and "--broker" in bad.output


def test_demo_broker_option_runs_against_a_real_mosquitto(mosquitto):
    out = fleetctl("demo", "--broker", mosquitto.url, "--agents", "1", "--duration", "4", "--interval", "0.5",
                   "--rollout-at", "0", "--json", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["broker"] == mosquitto.url and summary["embedded_broker"] is False
    assert summary["online_at_end"] == 1
