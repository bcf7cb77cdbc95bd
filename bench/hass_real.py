"""What a real Home Assistant makes of the fleet: entities, devices, areas, states, errors.

Starts Mosquitto on a free loopback port, a real Home Assistant (its own venv, given with
``--ha-python``; HA is far too big for our extras) with the MQTT integration pointed at it
and a ten-line probe integration that dumps HA's state machine and registries to a file, then
``fleetctl demo`` against that broker. It checks, mid-run and after the demo stops:

* every discovery config the agents published became an HA entity on the right HA device
  (the board, or the MCU ``via_device`` the board), in the board's ``suggested_area``;
* numeric sensors hold numbers or ``unknown`` (a guarded template), never a template error;
* connectivity is ``on`` while the demo runs and the entities go ``unavailable`` or ``off``
  once the agents' last wills fire;
* Home Assistant's log has no ERROR and no template warning from the MQTT integration.

Prints one JSON line; exits 1 when a check fails. Not part of the test suite (installing HA
takes minutes and hundreds of MB); run it after changing agent/core/hass.py::

    python -m venv /tmp/ha && /tmp/ha/bin/pip install homeassistant==2024.3.3 paho-mqtt==1.6.1 …
    python bench/hass_real.py --ha-python /tmp/ha/bin/python

HA 2024.3 is the last release for Python 3.11; its integrations' own requirements (frontend,
recorder, …) must be installed in that venv too (``--skip-pip`` is used: no download at run time).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = Path(__file__).resolve().parent.parent

PROBE = '''
"""Dump HA's states, entity and device registries to efprobe.json every second."""
import json
import os
from datetime import timedelta
from homeassistant.helpers import device_registry as dr, entity_registry as er
from homeassistant.helpers.event import async_track_time_interval


def _write(path, data):
    with open(path + ".tmp", "w") as fh:
        fh.write(data)
    os.replace(path + ".tmp", path)


async def async_setup(hass, config):
    async def dump(now=None):
        states = {s.entity_id: {"state": s.state, "attributes": dict(s.attributes)} for s in hass.states.async_all()}
        ents = [{"entity_id": e.entity_id, "unique_id": e.unique_id, "platform": e.platform,
                 "device_id": e.device_id} for e in er.async_get(hass).entities.values()]
        devs = [{"id": d.id, "name": d.name, "identifiers": [list(i) for i in d.identifiers],
                 "via_device_id": d.via_device_id, "area_id": d.area_id} for d in dr.async_get(hass).devices.values()]
        await hass.async_add_executor_job(_write, hass.config.path("efprobe.json"),
                                          json.dumps({"states": states, "entities": ents, "devices": devs}, default=str))
    async_track_time_interval(hass, dump, timedelta(seconds=1))
    return True
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_ha_config(cfg: Path, mqtt_port: int, http_port: int) -> None:
    (cfg / ".storage").mkdir(parents=True, exist_ok=True)
    (cfg / "custom_components" / "efprobe").mkdir(parents=True, exist_ok=True)
    (cfg / "configuration.yaml").write_text(
        "homeassistant:\n  name: edgefleet-check\n  latitude: 0\n  longitude: 0\n  elevation: 0\n"
        "  unit_system: metric\n  time_zone: UTC\n  country: DE\n"
        f"http:\n  server_host: 127.0.0.1\n  server_port: {http_port}\nlogger:\n  default: warning\nefprobe:\n")
    entry = {"entry_id": "edgefleetmqtt", "version": 1, "minor_version": 1, "domain": "mqtt", "title": "mosquitto",
             "data": {"broker": "127.0.0.1", "port": mqtt_port, "discovery": True}, "options": {},
             "pref_disable_new_entities": False, "pref_disable_polling": False, "source": "user",
             "unique_id": None, "disabled_by": None}
    (cfg / ".storage" / "core.config_entries").write_text(json.dumps(
        {"version": 1, "minor_version": 1, "key": "core.config_entries", "data": {"entries": [entry]}}))
    (cfg / "custom_components" / "efprobe" / "manifest.json").write_text(json.dumps(
        {"domain": "efprobe", "name": "edgefleet probe", "version": "1.0.0", "requirements": [],
         "dependencies": ["mqtt"], "codeowners": [], "documentation": "https://example.invalid", "iot_class": "local_push"}))
    (cfg / "custom_components" / "efprobe" / "__init__.py").write_text(PROBE)


def read_dump(cfg: Path) -> dict:
    try:
        return json.loads((cfg / "efprobe.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_dump(cfg: Path, pred, timeout: float, what: str) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        d = read_dump(cfg)
        if d and pred(d):
            return d
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def discovery_configs(port: int, seconds: float = 3.0) -> dict[str, dict]:
    """The retained discovery configs on the broker (what the agents announced)."""
    import paho.mqtt.client as mqtt

    got: dict[str, dict] = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="hass-real-check")
    c.on_connect = lambda cl, *a: cl.subscribe("homeassistant/+/+/+/config")

    def on_message(cl, ud, m):
        if m.payload:
            got[m.topic] = json.loads(m.payload)

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    time.sleep(seconds)  # retained messages arrive at once; this only bounds the collection
    c.loop_stop()
    c.disconnect()
    return got


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ha-python", required=True, help="python of a venv with homeassistant installed")
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--duration", type=float, default=60.0, help="demo seconds")
    ap.add_argument("--quick", action="store_true", help="shorter demo (40 s)")
    args = ap.parse_args()
    if args.quick:
        args.duration = 40.0
    ver = subprocess.run([args.ha_python, "-c", "import homeassistant.const as c; print(c.__version__)"],
                         capture_output=True, text=True)
    if ver.returncode:
        raise SystemExit(f"--ha-python {args.ha_python}: no homeassistant there ({ver.stderr.strip()[-200:]})")
    work = Path(tempfile.mkdtemp(prefix="hass-real-"))
    cfg = work / "ha"
    mqtt_port, http_port = free_port(), free_port()
    (work / "mosquitto.conf").write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n"
                                         "set_tcp_nodelay true\npersistence false\n")
    write_ha_config(cfg, mqtt_port, http_port)
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        procs.append(subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c",
                                       str(work / "mosquitto.conf")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([args.ha_python, "-m", "homeassistant", "-c", str(cfg), "--skip-pip"],
                                      stdout=open(work / "ha.out", "wb"), stderr=subprocess.STDOUT))
        wait_dump(cfg, lambda d: True, 180, "Home Assistant to start with the MQTT integration")
        ha_start_s = time.monotonic() - t0
        demo = subprocess.Popen([sys.executable, "-m", "controller.cli", "--broker", f"mqtt://127.0.0.1:{mqtt_port}",
                                 "demo", "--agents", str(args.agents), "--duration", str(args.duration)],
                                cwd=ROOT, stdout=open(work / "demo.out", "wb"), stderr=subprocess.STDOUT)
        procs.append(demo)
        boards = [f"demo-{i:02d}" for i in range(1, args.agents + 1)]

        def online(d: dict) -> bool:
            st = d.get("states", {})
            return all(st.get(f"binary_sensor.edgefleet_{b.replace('-', '_')}_status", {}).get("state") == "on"
                       and st.get(f"sensor.edgefleet_{b.replace('-', '_')}_inference_rate", {}).get("state")
                       not in (None, "unknown", "unavailable") for b in boards)

        live = wait_dump(cfg, online, 120 + args.duration, "every demo board online with a model in HA")
        configs = discovery_configs(mqtt_port)
        demo.wait(timeout=args.duration + 180)
        after = wait_dump(cfg, lambda d: all(
            d["states"].get(f"binary_sensor.edgefleet_{b.replace('-', '_')}_status", {}).get("state") in ("off", "unavailable")
            for b in boards), 60, "the boards to show offline after the demo")
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
    failures: list[str] = []
    ents = {e["unique_id"]: e for e in live["entities"] if e["platform"] == "mqtt"}
    devs = {d["id"]: d for d in live["devices"]}
    by_ident = {tuple(i): d for d in live["devices"] for i in d["identifiers"]}
    numeric = 0
    for topic, c in configs.items():
        e = ents.get(c.get("unique_id"))
        if e is None:
            failures.append(f"{topic}: no HA entity for unique_id {c.get('unique_id')}")
            continue
        ident = ("mqtt", c["device"]["identifiers"][0])
        dev = by_ident.get(ident)
        if dev is None or e["device_id"] != dev["id"]:
            failures.append(f"{topic}: entity {e['entity_id']} is not on HA device {ident}")
        elif c["device"].get("via_device") and devs.get(dev["via_device_id"], {}).get("identifiers") != [
                ["mqtt", c["device"]["via_device"]]]:
            failures.append(f"{topic}: HA device {dev['name']} is not via {c['device']['via_device']}")
        elif c["device"].get("suggested_area") and not dev["area_id"]:
            failures.append(f"{topic}: HA device {dev['name']} has no area (suggested {c['device']['suggested_area']})")
        state = live["states"].get(e["entity_id"], {}).get("state")
        if c.get("unit_of_measurement") or c.get("state_class") == "measurement":
            try:
                float(state)
                numeric += 1
            except (TypeError, ValueError):
                if state not in ("unknown", "unavailable"):
                    failures.append(f"{e['entity_id']}: numeric sensor holds {state!r}")
    log = (cfg / "home-assistant.log").read_text(errors="replace") if (cfg / "home-assistant.log").exists() else ""
    bad = [ln for ln in log.splitlines() if " ERROR " in ln or ("mqtt" in ln and "emplate" in ln and "WARNING" in ln)]
    failures += [f"HA log: {ln[:300]}" for ln in bad[:20]]
    stale_live = [e for e, s in after["states"].items() if "edgefleet" in e and s["state"] not in ("unavailable", "off")
                  and e.startswith(("sensor.", "binary_sensor."))]
    failures += [f"{e}: still {after['states'][e]['state']!r} after the demo stopped" for e in stale_live[:20]]
    out = {"ha_version": ver.stdout.strip(), "boards": len(boards), "discovery_configs": len(configs),
           "ha_entities": len(ents), "ha_devices": sum(1 for d in live["devices"] if d["identifiers"]
                                                      and d["identifiers"][0][1].startswith("edgefleet")),
           "numeric_sensors_with_values": numeric, "ha_log_errors": len(bad),
           "entities_not_unavailable_after_stop": len(stale_live), "ha_start_s": round(ha_start_s, 1),
           "failures": failures, "ok": not failures}
    if not failures:
        shutil.rmtree(work, ignore_errors=True)
    else:
        out["workdir"] = str(work)
    print(json.dumps(out))
    return 0 if not failures else 1


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    sys.exit(main())
