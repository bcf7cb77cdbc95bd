"""Lazy command loading: read-only commands import only what they use (a real subprocess, its
sys.modules checked), and the root --help lists every command with its real summary."""
from __future__ import annotations

import json
import subprocess
import sys

import click
import pytest

from controller.cli.app import COMMANDS, cli
from protocol.envelope import Envelope

from ..helpers.fleet import ENV, ROOT

HEAVY = ("numpy", "onnx", "onnxruntime", "paho", "cryptography", "psycopg", "ai_edge_litert")
PROBE = ("import json, sys\nfrom controller.cli.app import cli\n"
         "try:\n    cli.main(sys.argv[1:], prog_name='fleetctl')\nexcept SystemExit as e:\n    code = e.code\n"
         "print(json.dumps({'code': code, 'heavy': [m for m in %r if m in sys.modules]}), file=sys.stderr)\n" % (HEAVY,))


def _run(*args: str) -> tuple[dict, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=ENV, cwd=ROOT,
                       timeout=120)
    return json.loads(r.stderr.strip().splitlines()[-1]), r.stdout


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    from controller.registry import Registry

    path = tmp_path_factory.mktemp("lazy") / "registry.db"
    reg = Registry(path)
    reg.record_state(Envelope(kind="state", sender="pi-7", body={"status": "online"}))
    reg.commit()
    reg.close()
    return path


def test_devices_json_imports_no_mqtt_numpy_or_onnx(registry):
    probe, out = _run("--registry", str(registry), "devices", "--json")
    assert probe["code"] in (0, None)
    assert [d["id"] for d in json.loads(out)["devices"]] == ["pi-7"]     # the real answer, not an early exit
    assert probe["heavy"] == []


@pytest.mark.parametrize("args", [("--help",), ("devices", "--help"), ("status", "--help")])
def test_help_imports_nothing_heavy(args):
    probe, out = _run(*args)
    assert probe["code"] in (0, None) and "Usage: fleetctl" in out
    assert probe["heavy"] == []


def test_every_summary_is_the_commands_own():
    ctx = click.Context(cli)
    for name, lazy in COMMANDS.items():
        real = cli.get_command(ctx, name)
        assert real is not None, name
        for limit in (30, 45, 60, 200):
            assert click.Command(name, help=lazy.summary).get_short_help_str(limit) == \
                real.get_short_help_str(limit), (name, limit)


def test_grouped_commands_keep_their_additions():
    ctx = click.Context(cli)
    assert "tag" in cli.get_command(ctx, "device").commands
    assert "lineage" in cli.get_command(ctx, "model").commands
    assert {"pending", "accept", "reject", "revoke"} <= set(cli.get_command(ctx, "devices").commands)
