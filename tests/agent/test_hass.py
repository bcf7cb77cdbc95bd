"""HA discovery builders and their lifecycle (pure: templates rendered with strict Jinja2)."""
import json

import pytest

from agent.core import hass
from protocol.topics import Topics
from tests.helpers.hass import render, templates

T = Topics()


def configs(msgs):
    return {t: json.loads(p) for t, p in msgs}


def env(body):
    return {"schema": 1, "kind": "telemetry", "id": "x", "sender": "pi-1", "ts": 1.0, "body": body}


@pytest.mark.parametrize("body", [{}, {"mcu": {}}, {"mcu": {"devices": {}}}, {"model": None, "learning": {"drift": None}},
                                  {"cpu_percent": None, "load": [], "disk": {}}])
def test_no_template_fails_on_missing_or_null_values(body):
    msgs = hass.discovery_messages(T, "pi-1", "homeassistant", "0.1", area="kitchen")
    msgs += hass.mcu_discovery_messages(T, "pi-1", "homeassistant", "mcu-1", "fw-1")
    for topic, cfg in configs(msgs).items():
        for key, _, tmpl in templates(cfg):
            out = render(tmpl, env(body))      # StrictUndefined: an unguarded path raises
            numeric = "unit_of_measurement" in cfg or cfg.get("state_class")
            if key == "value_template" and cfg["unique_id"].endswith("_model"):
                assert json.loads(out) == {"installed_version": None, "in_progress": False}
            elif key == "value_template" and numeric:
                assert out == "None", (topic, out)          # HA: unknown
            else:
                assert out in ("", "offline", "OFF"), (topic, key, out)   # never the string 'None'


def test_values_render_from_a_full_body():
    body = {"cpu_percent": 12.5, "load": [0.5, 0.4, 0.3], "model": {"throughput_per_s": 3.5,
            "latency_ms": {"p99_ms": 1.25}, "mean_confidence": 0.9},
            "learning": {"holdout_accuracy": 0.93, "drift": {"score": 0.1}},
            "mcu": {"devices": {"mcu-1": {"online": True, "results_total": 7, "uptime_s": 4,
                                          "last_result": {"label": "3", "confidence": 0.8, "source": "board"}}}}}
    msgs = hass.discovery_messages(T, "pi-1", "homeassistant", "0.1")
    msgs += hass.mcu_discovery_messages(T, "pi-1", "homeassistant", "mcu-1")
    got = {cfg["unique_id"]: render(cfg["value_template"], env(body)) for cfg in configs(msgs).values()}
    assert got["edgefleet_pi-1_cpu"] == "12.5" and got["edgefleet_pi-1_load"] == "0.5"
    assert got["edgefleet_pi-1_latency_p99"] == "1.25" and got["edgefleet_pi-1_accuracy"] == "0.93"
    assert got["edgefleet_pi-1_mcu_mcu-1_last_label"] == "3" and got["edgefleet_pi-1_mcu_mcu-1_results"] == "7"
    assert got["edgefleet_pi-1_mcu_mcu-1_online"] == "ON"
    mcu_cfg = next(c for c in configs(msgs).values() if c["unique_id"] == "edgefleet_pi-1_mcu_mcu-1_results")
    # an MCU entity is available only while the board is online AND the MCU is
    assert mcu_cfg["availability_mode"] == "all"
    assert [render(a["value_template"], env(body)) for a in mcu_cfg["availability"]] == ["", "online"]
    state = {**env({"status": "online", "model": {"version": "2.0"}, "update": {"state": "downloading"}}), "kind": "state"}
    model = next(c for c in configs(msgs).values() if c["unique_id"] == "edgefleet_pi-1_model")
    assert json.loads(render(model["value_template"], state)) == {"installed_version": "2.0", "in_progress": True}


def test_area_is_suggested_for_the_board_and_its_mcus():
    for msgs in (hass.discovery_messages(T, "pi-1", "ha", "0.1", area="Barn 2"),
                 hass.mcu_discovery_messages(T, "pi-1", "ha", "m", area="Barn 2")):
        assert {c["device"].get("suggested_area") for c in configs(msgs).values()} == {"Barn 2"}
    assert "suggested_area" not in json.loads(hass.discovery_messages(T, "pi-1", "ha", "0.1")[0][1])["device"]


def test_announced_topics_persist_and_what_is_gone_is_stale(tmp_path):
    a = hass.Announced(tmp_path / "a.json")
    assert a.replace(["x", "y", "z"]) == []
    b = hass.Announced(tmp_path / "a.json")           # a restart reads what was announced
    assert b.topics == {"x", "y", "z"}
    assert b.replace(["x"]) == ["y", "z"]
    assert hass.Announced(tmp_path / "a.json").topics == {"x"}
    (tmp_path / "bad.json").write_text("{not json")
    assert hass.Announced(tmp_path / "bad.json").topics == set()   # unreadable: nothing known to clear
    assert hass.stale(["a", "b"], ["b", "c"]) == ["a"]
