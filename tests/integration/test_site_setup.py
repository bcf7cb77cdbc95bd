"""The documented broker set-up works literally (issue 17): the shell block of docs/install-on-a-board.md
("The broker") run as written, into a directory standing in for Debian's /etc/mosquitto (its main
mosquitto.conf, include_dir conf.d), then an agent and the controller configured from the shipped
example configs connect over TLS + ACL, Home Assistant's block reads what HA needs, and the broker
logged no warning but the three documented ones.

On the old code: Mosquitto refused to start ("Duplicate persistence_location"); the install line
mixed working directories (``acl`` was not next to ``pki/``); controller.toml had no TLS keys; the
ACL had no Home Assistant user."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.certs import init_ca, issue_client
from tests.helpers.broker import free_port, mosquitto_binary, wait_port
from tests.helpers.fleet import ENV, ROOT, device, stop
from tests.helpers.waiting import wait_for
from tests.integration.test_broker_security import TlsClient

# Debian's /etc/mosquitto/mosquitto.conf (package mosquitto 2.0.11, also Raspberry Pi OS and Ubuntu)
DEBIAN_MAIN = """\
# Place your local configuration in /etc/mosquitto/conf.d/
#
# A full description of the configuration file is at
# /usr/share/doc/mosquitto/examples/mosquitto.conf.example

pid_file /run/mosquitto/mosquitto.pid

persistence true
persistence_location /var/lib/mosquitto/

log_dest file /var/log/mosquitto/mosquitto.log

include_dir /etc/mosquitto/conf.d
"""

#: the start-up warnings configs/mosquitto/README.md ("Start-up warnings") documents, and no others
DOCUMENTED = [f"Warning: ACL pattern '{t}' does not contain '%c' or '%u'."
              for t in ("edgefleet/v1/group/+/cmd", "edgefleet/v1/offload/req", "edgefleet/v1/offload/req/+",
                        "edgefleet/v1/offload/workers/+", "homeassistant/status")]
#: this test runs Mosquitto as root (its test directories are root's); a real install does not
ROOT_ONLY = "Warning: Mosquitto should not be run as root/administrator."


def broker_block() -> list[str]:
    """The command lines of the first ``sh`` block under "## The broker" in docs/install-on-a-board.md."""
    doc = (ROOT / "docs" / "install-on-a-board.md").read_text()
    section = doc.split("\n## The broker", 1)[1]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    return [l for l in block.splitlines() if l.strip() and not l.lstrip().startswith("#")]


def to_test_paths(line: str, etc: Path) -> str | None:
    """One documented line as this test runs it: no sudo, our fleetctl, /etc/mosquitto -> ``etc``.
    The package install and the service restart are the test's own (None)."""
    if "apt-get install" in line or "systemctl restart mosquitto" in line:
        return None
    line = line.replace("sudo ", "").replace("/etc/mosquitto", str(etc))
    # the server certificate must name the address the test connects to
    line = line.replace("--host broker.site.lan --host 10.0.0.5", "--host 127.0.0.1")
    return re.sub(r"^fleetctl ", f"{sys.executable} -m controller.cli ", line)


def uncomment(text: str, keys: tuple[str, ...]) -> str:
    for k in keys:
        text = re.sub(rf"^# {k} = ", f"{k} = ", text, count=1, flags=re.M)
    return text


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("site")
    checkout = tmp / "checkout"               # the commands run in the root of a checkout
    shutil.copytree(ROOT / "configs", checkout / "configs")
    shutil.copytree(ROOT / "docs", checkout / "docs")
    etc = tmp / "etc-mosquitto"
    (etc / "conf.d").mkdir(parents=True)
    (tmp / "run").mkdir()
    main = (DEBIAN_MAIN.replace("/etc/mosquitto", str(etc)).replace("/run/mosquitto/", f"{tmp}/run/")
            .replace("/var/lib/mosquitto/", f"{tmp}/").replace("/var/log/mosquitto/", f"{tmp}/"))
    (etc / "mosquitto.conf").write_text(main + ("user root\n" if os.geteuid() == 0 else ""))
    lines = broker_block()
    assert any("configs/mosquitto/edgefleet.conf" in l and "conf.d" in l for l in lines), lines
    for line in filter(None, (to_test_paths(l, etc) for l in lines)):
        p = subprocess.run(line, shell=True, cwd=checkout, env=ENV, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, f"documented step failed: {line}\n{p.stdout}{p.stderr}"
    conf = etc / "conf.d" / "edgefleet.conf"
    port = free_port()
    # the installed snippet's two rewrites: a free loopback port, and the stand-in for /etc/mosquitto
    conf.write_text(conf.read_text().replace("listener 8883", f"listener {port} 127.0.0.1")
                    .replace("/etc/mosquitto/", f"{etc}/"))
    stderr = tmp / "mosquitto.stderr"
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(etc / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                            stderr=open(stderr, "wb"))
    try:
        wait_port(port, timeout=20)
    except TimeoutError:
        proc.kill()
        proc.wait()
        raise AssertionError(f"mosquitto did not start: {stderr.read_text()}{_read(tmp / 'mosquitto.log')}") from None
    pki = checkout / "pki"
    url = f"mqtts://127.0.0.1:{port}"
    # the shipped example configs, TLS keys uncommented, paths pointed at this site
    ctl_cfg = tmp / "controller.toml"
    text = uncomment((ROOT / "configs" / "controller.toml").read_text(), ("ca_file", "cert_file", "key_file"))
    text = (text.replace('broker = "mqtt://127.0.0.1:1883"', f'broker = "{url}"').replace("/etc/edgefleet/", f"{pki}/")
            .replace("/var/lib/edgefleet/controller.db", str(tmp / "registry.db")))
    assert f'cert_file = "{pki}/controller.pem"' in text, text
    ctl_cfg.write_text(text)
    agent_cfg = tmp / "pi-07.toml"
    text = uncomment((ROOT / "configs" / "agent.toml").read_text(), ("ca_file", "cert_file", "key_file"))
    text = (text.replace('broker = "mqtt://127.0.0.1:1883"', f'broker = "{url}"').replace("/etc/edgefleet/", f"{pki}/")
            .replace('dir = "/var/lib/edgefleet"', f'dir = "{tmp / "pi-07"}"').replace("interval_s = 10.0", "interval_s = 0.5"))
    assert f'key_file = "{pki}/pi-07.key"' in text, text
    agent_cfg.write_text(text)
    procs = [subprocess.Popen([sys.executable, "-m", "controller.cli", "--config", str(ctl_cfg), "serve"], env=ENV,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "controller.log", "wb")),
             subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(agent_cfg)], env=ENV,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(tmp / "pi-07.log", "wb"))]
    try:
        yield {"tmp": tmp, "port": port, "pki": pki, "db": tmp / "registry.db", "stderr": stderr, "agent_cfg": agent_cfg}
    finally:
        for p in procs:
            stop(p)
        proc.terminate()
        proc.wait(10)


def _read(p: Path) -> str:
    return p.read_text(errors="replace") if p.exists() else ""


def test_documented_site_setup(site):
    """One test, one broker (the fixture is expensive): agent + controller, Home Assistant, the log."""
    tel = wait_for(lambda: (d := device(site["db"], "pi-07")) and d.online and d.telemetry, timeout=30,
                   what="pi-07 online with telemetry in the registry (agent -> TLS broker -> controller)")
    assert tel["link"]["connects"] >= 1
    # Home Assistant's user reads what HA needs and writes only its own status
    pki, port = site["pki"], site["port"]
    ha = TlsClient(port, pki / "ca.pem", pki / "homeassistant.pem", pki / "homeassistant.key", "homeassistant", v5=True)
    try:
        assert ha.connected.wait(15), ha.refused
        ha.subscribe("homeassistant/#", "edgefleet/v1/dev/+/state", "edgefleet/v1/dev/+/telemetry",
                     "edgefleet/v1/ctl/desired/+")
        wait_for(lambda: {t for t, _ in ha.got} >= {"edgefleet/v1/dev/pi-07/state", "edgefleet/v1/dev/pi-07/telemetry"}
                 and any(t.startswith("homeassistant/") and t.endswith("/config") for t, _ in ha.got),
                 timeout=20, what="HA sees pi-07's discovery, state and telemetry")
        assert ha.publish("homeassistant/status", b"online") == "Success"
        assert ha.publish("edgefleet/v1/dev/pi-07/cmd", b"{}") == "Not authorized"
        assert ha.publish("homeassistant/sensor/pi-07/cpu/config", b"{}") == "Not authorized"
    finally:
        ha.close()
    # the broker logged no warning but the documented three (the steps below provoke refusals on purpose)
    seen = {p: len(_read(p)) for p in (site["tmp"] / "mosquitto.log", site["stderr"])}
    log = _read(site["tmp"] / "mosquitto.log") + _read(site["stderr"])
    problems = [l.split(": ", 1)[-1] for l in log.splitlines() if re.search(r"\b(Warning|Error)\b", l)]
    readme = (ROOT / "configs" / "mosquitto" / "README.md").read_text()
    assert all(w in readme for w in DOCUMENTED)
    assert sorted(p for p in problems if p != ROOT_ONLY) == sorted(DOCUMENTED), log
    assert "New client connected" in log and "u'pi-07'" in log and "u'controller'" in log, log
    # a device id that does not match its certificate's CN: check --connect connects (the identity is
    # valid), then run is refused its own subtree by the ACL and says so, naming the id and the CN
    issue_client(pki, "pi-09")
    wrong = site["tmp"] / "pi-10.toml"
    wrong.write_text(site["agent_cfg"].read_text().replace('id = "pi-07"', 'id = "pi-10"')
                     .replace("pi-07.pem", "pi-09.pem").replace("pi-07.key", "pi-09.key")
                     .replace(str(site["tmp"] / "pi-07"), str(site["tmp"] / "pi-10")))
    chk = subprocess.run([sys.executable, "-m", "agent.cli", "check", "--config", str(wrong), "--connect"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert chk.returncode == 0 and "connected as pi-10" in chk.stdout, chk.stdout + chk.stderr
    # a certificate from another CA: check --connect says the broker refused it (TLS), naming nothing else
    other = site["tmp"] / "other-pki"
    init_ca(other)
    issue_client(other, "pi-10")
    stranger = site["tmp"] / "stranger.toml"
    stranger.write_text(wrong.read_text().replace(f"{pki}/pi-09.pem", f"{other}/pi-10.pem")
                        .replace(f"{pki}/pi-09.key", f"{other}/pi-10.key"))
    chk = subprocess.run([sys.executable, "-m", "agent.cli", "check", "--config", str(stranger), "--connect"],
                         capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=60)
    assert chk.returncode == 2 and f"error: broker mqtts://127.0.0.1:{port}: TLS: the broker refused our client " \
        "certificate" in chk.stderr, chk.stdout + chk.stderr
    log10 = site["tmp"] / "pi-10.log"
    p10 = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(wrong)], env=ENV, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=open(log10, "wb"))
    try:
        wait_for(lambda: re.search(r"ERROR .*edgefleet/v1/dev/pi-10/\w+: not authorized .*id is 'pi-10' but its "
                                   r"certificate CN is 'pi-09'", _read(log10)), timeout=30,
                 what="ERROR naming the device id and the certificate CN")
    finally:
        stop(p10)
    after = "\n".join(_read(p)[n:] for p, n in seen.items())
    provoked = [l for l in after.splitlines() if re.search(r"\b(Warning|Error)\b", l)]
    assert all("certificate verify failed" in l for l in provoked), provoked   # the stranger's certificate
