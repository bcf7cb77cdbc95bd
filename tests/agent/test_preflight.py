"""``edge-agent check`` checks what ``run`` will open (agent/core/preflight.py), naming each file.

On the old code ``check`` said "config OK" for a missing TLS key, an expired certificate, a key that
does not match its certificate, a missing or corrupt bundle; ``run`` then died with a traceback
(or ran with no model, silently)."""
from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys

from agent.core.config import parse_config
from agent.core.preflight import check_bundle, check_files, check_state_dir, check_tls
from controller.certs import init_ca, issue_client
from tests.helpers.fleet import ENV, ROOT


def cfg_for(tmp_path, **mqtt):
    return parse_config({"device": {"id": "pi-1"}, "state": {"dir": str(tmp_path / "state")},
                         "mqtt": {"broker": "mqtts://127.0.0.1:8883", **{k: str(v) for k, v in mqtt.items()}}})


def texts(findings):
    return [f.text for f in findings if f.problem]


def test_good_tls_files_pass_and_missing_ones_are_named(tmp_path):
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_client(pki, "pi-1")
    good = cfg_for(tmp_path, ca_file=pki / "ca.pem", cert_file=pki / "pi-1.pem", key_file=pki / "pi-1.key")
    assert texts(check_files(good)) == []
    gone = cfg_for(tmp_path, ca_file=pki / "ca.pem", cert_file=pki / "pi-1.pem", key_file=pki / "nope.key")
    assert texts(check_tls(gone)) == [f"mqtt.key_file {pki / 'nope.key'} does not exist"]


def test_expiry_and_a_key_that_does_not_match_its_certificate(tmp_path):
    pki = tmp_path / "pki"
    init_ca(pki)
    issue_client(pki, "pi-1", days=10)
    issue_client(pki, "pi-2")
    soon = cfg_for(tmp_path, ca_file=pki / "ca.pem", cert_file=pki / "pi-1.pem", key_file=pki / "pi-1.key")
    findings = check_tls(soon)
    assert not texts(findings) and any("expires on" in f.text and "pi-1.pem" in f.text for f in findings)
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=11)
    assert any("expired on" in t and "mqtt.cert_file" in t for t in texts(check_tls(soon, now=later)))
    mixed = cfg_for(tmp_path, ca_file=pki / "ca.pem", cert_file=pki / "pi-1.pem", key_file=pki / "pi-2.key")
    (t,) = texts(check_tls(mixed))
    assert "pi-1.pem" in t and "pi-2.key" in t


def test_bundle_dir_is_loaded_and_verified(tmp_path, example_bundle):
    example_bundle = example_bundle[0]
    assert check_bundle(str(example_bundle)) == []
    assert texts(check_bundle(str(tmp_path / "missing"))) == [f"model.bundle {tmp_path / 'missing'} does not exist "
                                                              "(or is not a directory)"]
    bad = tmp_path / "bad"
    shutil.copytree(example_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    victim = next(iter(m["files"]))
    with open(bad / victim, "ab") as fh:
        fh.write(b"x")
    (t,) = texts(check_bundle(str(bad)))
    assert t.startswith(f"model.bundle {bad}: {victim}")


def test_state_dir_must_be_a_writable_or_creatable_directory(tmp_path):
    assert check_state_dir(str(tmp_path / "new" / "state")) == []
    (tmp_path / "f").write_text("")
    assert texts(check_state_dir(str(tmp_path / "f"))) == [f"state.dir {tmp_path / 'f'} is not a directory"]


def test_check_and_run_exit_with_one_line_per_problem_naming_the_file(tmp_path):
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[device]\nid = "pi-1"\n[mqtt]\nbroker = "mqtts://127.0.0.1:1"\nca_file = "{tmp_path}/ca.pem"\n'
                   f'cert_file = "{tmp_path}/pi-1.pem"\nkey_file = "{tmp_path}/pi-1.key"\n'
                   f'[state]\ndir = "{tmp_path / "s"}"\n[model]\nbundle = "{tmp_path / "nob"}"\n')
    chk = subprocess.run([sys.executable, "-m", "agent.cli", "check", "--config", str(cfg)], capture_output=True,
                         text=True, env=ENV, cwd=ROOT, timeout=60)
    assert chk.returncode == 2, chk.stderr
    assert [l for l in chk.stderr.splitlines() if l.startswith("error:")] == [
        f"error: mqtt.ca_file {tmp_path}/ca.pem does not exist", f"error: mqtt.cert_file {tmp_path}/pi-1.pem does not exist",
        f"error: mqtt.key_file {tmp_path}/pi-1.key does not exist",
        f"error: model.bundle {tmp_path / 'nob'} does not exist (or is not a directory)"]
    run = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)], capture_output=True,
                         text=True, env=ENV, cwd=ROOT, timeout=60)
    assert run.returncode == 78, run.stderr          # EX_CONFIG: RestartPreventExitStatus=78 in the unit
    assert "Traceback" not in run.stderr
    assert f"config error: mqtt.ca_file {tmp_path}/ca.pem does not exist" in run.stderr
    assert f"WARNING edge_agent.serving: model.bundle {tmp_path / 'nob'} does not exist" in run.stderr
