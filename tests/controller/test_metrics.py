"""The Prometheus endpoint (controller/metrics.py) and the shipped Grafana dashboard that reads it."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import pytest

from controller.config import ConfigError, MetricsSection, parse_config
from controller.metrics import METRICS, Metrics, NoMetrics, make_metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "configs" / "grafana" / "edgefleet.json"
SUFFIXES = ("_total", "_bucket", "_sum", "_count")


def exported(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_metric_is_exported_with_the_documented_name():
    m = Metrics(gauges={"edgefleet_devices_online": lambda: 3}, counters={"edgefleet_dropped": lambda: 0})
    m.message("telemetry")
    m.message("telemetry")
    m.reject("bad_json")
    m.lags([0.2, -0.1])
    m.commit(0.004, 12)
    text = m.render().decode()
    assert 'edgefleet_messages_total{kind="telemetry"} 2.0' in text
    assert 'edgefleet_rejects_total{reason="bad_json"} 1.0' in text
    assert "edgefleet_devices_online 3.0" in text and "edgefleet_dropped_total 0.0" in text
    assert "edgefleet_ingest_lag_seconds_count 2.0" in text
    assert 'edgefleet_ingest_lag_seconds_bucket{le="0.25"} 2.0' in text    # a negative lag (clock skew) is 0
    names = {n for n in exported(text) if not n.endswith("_created")}
    bases = {re.sub("(_total|_bucket|_sum|_count)$", "", n) for n in names}
    assert bases <= set(METRICS), bases - set(METRICS)


def test_the_dashboard_queries_only_exported_metrics_and_covers_each_area():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = set()
    for e in exprs:
        for name in re.findall(r"\bedgefleet_[a-z_]+", e):
            base = name
            for suf in SUFFIXES:
                if base.endswith(suf) and base[:-len(suf)] in METRICS:
                    base = base[:-len(suf)]
            assert base in METRICS, f"dashboard query {e!r} names {name}, which controller/metrics.py does not export"
            kind = METRICS[base][0]
            if kind == "counter":
                assert name == base + "_total", f"{name}: a counter is queried as {base}_total"
            if kind == "histogram":
                assert name != base, f"{name}: a histogram is queried through _bucket/_sum/_count"
            used.add(base)
    for area in ("edgefleet_devices_online", "edgefleet_messages", "edgefleet_rejects", "edgefleet_dropped",
                 "edgefleet_ingest_lag_seconds", "edgefleet_db_commit_seconds", "edgefleet_rounds_running",
                 "edgefleet_rollouts_running"):
        assert area in used, f"the dashboard shows nothing of {area}"


def test_the_endpoint_serves_on_loopback_and_is_off_by_default():
    assert isinstance(make_metrics(MetricsSection()), NoMetrics)
    assert not make_metrics(MetricsSection()).enabled
    m = make_metrics(MetricsSection(), port_override=0)
    assert isinstance(m, NoMetrics)           # --metrics-port 0 is "off" too
    m = Metrics(gauges={"edgefleet_devices_online": lambda: 7})
    port = m.serve("127.0.0.1", 0)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "edgefleet_devices_online 7.0" in body
    finally:
        m.close()


def test_metrics_config_is_validated():
    assert parse_config({"metrics": {"port": 9464}}).metrics.host == "127.0.0.1"
    with pytest.raises(ConfigError, match="metrics.port"):
        parse_config({"metrics": {"port": 70000}})
    with pytest.raises(ConfigError, match="controller.replica"):
        parse_config({"controller": {"replica": "bad id/with slash"}})
    with pytest.raises(ConfigError, match="lease_ttl_s"):
        parse_config({"controller": {"lease_ttl_s": 0.1}})
