"""What fleetctl prints (issue 17): tables with significant digits, fields instead of Python reprs,
timestamps on telemetry lines, the device commands in ``cmd --help``, one clear line for bad input,
and a broker that cannot be reached named with the reason, fast. Registry-level (no broker) except
the reach checks, which use loopback sockets."""
from __future__ import annotations

import re
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli import cli
from controller.registry import Registry
from controller.table import fmt
from protocol.envelope import Envelope


def ctl(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.mark.parametrize("v,text", [(0.99, "0.99"), (0.0029, "0.0029"), (0.98765, "0.988"), (45.23, "45.2"),
                                    (12345.6, "12346"), (0.0, "0"), (None, "-"), (True, "yes")])
def test_cells_keep_significant_digits(v, text):
    assert fmt(v) == text


TELEMETRY = {"seq": 7, "cpu_percent": 12.5, "load": [0.5, 0.4, 0.3], "mem_used_percent": 40.0, "rss_mb": 55.1,
             "uptime_s": 100.0, "agent_uptime_s": 50.0,
             "bytes": {"tx": {"telemetry": 900, "state": 100}, "rx": {"cmd": 20}, "tx_total": 1000, "rx_total": 20},
             "model": {"name": "digits", "version": "1.0.0", "runtime": "onnxruntime", "inferences": 40,
                       "input_errors": 1, "mean_confidence": 0.0029, "latency_ms": {"p95_ms": 3.25}},
             "offload": {"enabled": True, "threshold": 0.99, "mode": "features", "requests": 10, "offloaded": 3,
                         "offload_rate": 0.3, "timeouts": 0, "bytes_sent": 4096, "agreement": 0.99,
                         "remote_latency_ms": {"p50_ms": 2.0, "p95_ms": 4.5}}}


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "registry.db"
    reg = Registry(path)
    reg.record_state(Envelope(kind="state", sender="pi-1", body={"status": "online"}))
    reg.record_telemetry(Envelope(kind="telemetry", sender="pi-1", body=TELEMETRY, ts=1767225600.25))
    reg.commit()
    reg.close()
    return path


def no_repr(text: str) -> None:
    assert not re.search(r"[{}\[\]]|': ", text), text


def test_device_show_prints_fields_not_dict_reprs(db):
    out = ctl("--db", str(db), "device", "show", "pi-1")
    assert out.exit_code == 0, out.output
    no_repr(out.output)
    assert "tx 1000" in out.output and "telemetry=900" in out.output and "0.0029" in out.output, out.output


def test_offload_status_prints_a_table_and_a_fleet_line(db):
    out = ctl("--db", str(db), "offload", "status")
    assert out.exit_code == 0, out.output
    no_repr(out.output)
    assert "0.99" in out.output and "fleet: 10 requests, 3 offloaded" in out.output, out.output


def test_telemetry_lines_carry_timestamps(db):
    out = ctl("--db", str(db), "telemetry", "--device", "pi-1")
    assert out.exit_code == 0, out.output
    assert out.output.startswith("2026-01-01T00:00:00.250Z pi-1 "), out.output


def round_db(tmp_path: Path) -> Path:
    import numpy as np

    from controller.fl.store import RoundStore

    path = tmp_path / "registry.db"
    store = RoundStore.open(str(path))
    store.create_run("run-1", {"rounds": 2, "mode": "sync", "strategy": "fedavg"}, {"dense0.bias": np.zeros(2)})
    for n in (1, 2):
        store.start_round("run-1", n, 1.0, 2.0, ("a",), {"a": 1})
        store.finish_round("run-1", n, "aggregated", {"accuracy": 0.99, "mean_train_loss": 0.0029,
                                                      "uplink_bytes": 5000, "received": 1, "dp_epsilon": 0.0029})
    store.update_run("run-1", status="done")
    return path


def test_round_table_and_report_rounds_table(tmp_path):
    path = round_db(tmp_path)
    st = ctl("--db", str(path), "round", "status", "run-1")
    assert st.exit_code == 0, st.output
    assert "0.99" in st.output and "0.0029" in st.output and " 1.0 " not in st.output, st.output
    rep = ctl("--db", str(path), "report", "rounds", "run-1")
    assert rep.exit_code == 0 and rep.output.splitlines()[1].split()[:3] == ["ROUND", "STATUS", "ACCURACY"], rep.output
    assert "0.0029" in rep.output and not rep.output.lstrip().startswith("{")
    js = ctl("--db", str(path), "report", "rounds", "run-1", "--json")
    assert js.output.lstrip().startswith("{")


def test_uplink_axis_is_not_zoomed_to_a_byte():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from controller.cli.report import chart

    rows = [{"round": i, "accuracy": 0.9, "mean_train_loss": 0.1, "uplink_bytes": 5000} for i in (1, 2, 3)]
    fig = chart(plt, rows, "t")
    lo, hi = fig.axes[2].get_ylim()
    plt.close(fig)
    assert lo == 0 and hi >= 5000


def test_cmd_help_lists_every_command_an_agent_declares():
    from controller.cli.select import device_command_names

    out = ctl("cmd", "--help")
    assert "Commands a device accepts" in out.output and "offload.set" in out.output
    # what agent/app.py and the features declare (their command tables), read from the source
    root = Path(__file__).resolve().parents[2] / "agent"
    declared = set()
    for f in root.rglob("*.py"):
        text = f.read_text()
        for block in re.findall(r"def commands\(self\).*?\n(?:        .*\n)+", text):
            declared.update(re.findall(r'"([a-z]+(?:\.[a-z_]+)?)":\s*(?:self\.|lambda)', block))
        m = re.search(r"self\.commands = \{(.*?)\}", text, re.S)
        if m:
            declared.update(re.findall(r'"([a-z.]+)":', m.group(1)))
    assert {"ping", "offload.set", "model.rollback"} <= declared
    assert declared <= device_command_names(), declared - device_command_names()


def test_serve_with_a_missing_signing_key_is_one_line_and_ex_config(tmp_path):
    """78 (EX_CONFIG) like every other config error: the unit's RestartPreventExitStatus=78 stops a
    restart loop that could never succeed (it was 2, so systemd restarted it forever)."""
    out = CliRunner().invoke(cli, ["--db", str(tmp_path / "r.db"), "--broker", "mqtt://127.0.0.1:1",
                                   "--signing-key", str(tmp_path / "nope.pem"), "serve"])
    assert out.exit_code == 78, out.output
    lines = out.output.strip().splitlines()
    assert len(lines) == 1 and "nope.pem" in lines[0] and "fleetctl keys init" in lines[0], out.output
    assert "Traceback" not in out.output


def test_patch_make_into_a_missing_dir_and_keys_into_an_unwritable_one(tmp_path):
    from .test_artifact_quarantine import write_bundle

    assert ctl("keys", "init", "--dir", str(tmp_path / "k")).exit_code == 0
    b = write_bundle(tmp_path / "v1", "1.0.0", 1, b"x" * 100)
    out = CliRunner().invoke(cli, ["patch", "make", str(b), str(b), str(tmp_path / "no" / "p.efp"), "--full",
                                   "--key", str(tmp_path / "k" / "controller.pem")])
    assert out.exit_code == 2 and str(tmp_path / "no") in out.output and "does not exist" in out.output, out.output
    (tmp_path / "file").write_text("")
    out = CliRunner().invoke(cli, ["keys", "init", "--dir", str(tmp_path / "file" / "sub")])
    assert out.exit_code == 1 and "cannot write the key pair" in out.output and out.exception is not None
    assert isinstance(out.exception, SystemExit), out.exception


# -- an unreachable broker -----------------------------------------------------------------------

def test_classify_names_the_kind():
    from controller.reach import classify

    assert classify(socket.gaierror(-2, "Name or service not known")).kind == "dns"
    assert classify(ConnectionRefusedError(111, "Connection refused")).kind == "refused"
    assert classify(socket.timeout("timed out")).kind == "timeout"
    assert classify(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")).kind == "tls"


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_diagnose_refused_and_tls_on_loopback():
    from controller.reach import diagnose
    from protocol.mqttlink import parse_broker_url

    assert diagnose(parse_broker_url(f"mqtt://127.0.0.1:{closed_port()}"), None).kind == "refused"
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def plain():   # a plain-TCP answer where TLS is expected (mqtts:// to a 1883 listener)
        c, _ = srv.accept()
        c.recv(1024)
        c.sendall(b"\x20\x02\x00\x05" * 8)
        c.close()
    threading.Thread(target=plain, daemon=True).start()
    bad = diagnose(parse_broker_url(f"mqtts://127.0.0.1:{srv.getsockname()[1]}"), None)
    srv.close()
    assert bad is not None and bad.kind in ("tls", "network"), bad


def test_a_command_fails_fast_naming_the_address_and_the_reason():
    port = closed_port()
    t0 = time.monotonic()
    out = CliRunner().invoke(cli, ["--broker", f"mqtt://127.0.0.1:{port}", "cmd", "pi-1", "ping"])
    took = time.monotonic() - t0
    assert out.exit_code == 1, out.output
    assert f"127.0.0.1:{port}" in out.output and "refused" in out.output, out.output
    assert took < 8, took   # 2 s head start + the probe; the old code waited 10 s and said "timeout"


# -- why a round cannot start ----------------------------------------------------------------------

def test_why_waiting_groups_the_reasons():
    from controller.fl.selection import ClientInfo, SelectionPolicy, select, why_waiting

    clients = [ClientInfo("pi-1", True, 100, cpu_percent=97.0), ClientInfo("pi-2", True, 100, cpu_percent=95.5),
               ClientInfo("pi-3", False, 100), ClientInfo("pi-4", True, 100, cpu_percent=10.0)]
    sel = select(clients, SelectionPolicy(clients=4, max_cpu_percent=90))
    why = why_waiting(sel, 3)
    assert why.startswith("1 of 3 devices needed are eligible"), why
    assert "busy (cpu > 90%) on 2: pi-1, pi-2" in why and "offline on 1: pi-3" in why, why
