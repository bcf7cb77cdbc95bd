"""The Prometheus endpoint of `fleetctl serve`: what an operator watches on a fleet dashboard.

Off unless ``[metrics] port`` (or ``fleetctl serve --metrics-port``) is set; it listens on
loopback by default (scrape it through a local agent or a reverse proxy). prometheus-client is
an optional dependency (the ``metrics`` extra) and is imported only when the endpoint is on.

The names below are the contract the shipped Grafana dashboard (configs/grafana/edgefleet.json)
reads; tests/controller/test_metrics.py checks that every query there names one of them.
Hot-path cost: one pre-bound counter increment per message and one histogram observation per
stored message; everything else (devices online, queue depth, drops, rounds, rollouts, leases)
is read from the service's own counters when Prometheus scrapes.
"""
from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # pragma: no cover
    from .config import MetricsSection

log = logging.getLogger("fleetctl.metrics")

PREFIX = "edgefleet_"

#: every metric we export: name -> (type, help). The dashboard may use only these (plus the
#: _bucket/_sum/_count/_total series Prometheus derives from them).
METRICS: dict[str, tuple[str, str]] = {
    "edgefleet_devices_online": ("gauge", "devices whose last state is online"),
    "edgefleet_devices_known": ("gauge", "devices in the registry"),
    "edgefleet_messages": ("counter", "messages taken off the broker, by kind (state, telemetry, events, ...)"),
    "edgefleet_duplicates": ("counter", "messages already stored (same message id), by kind"),
    "edgefleet_rejects": ("counter", "messages refused, by reason"),
    "edgefleet_dropped": ("counter", "messages shed after the broker handed them over (should stay 0)"),
    "edgefleet_inbound_queue": ("gauge", "messages waiting between the MQTT thread and the ingest task"),
    "edgefleet_ingest_lag_seconds": ("histogram", "stored time - the message's own ts, per stored message"),
    "edgefleet_db_commit_seconds": ("histogram", "registry commit latency, per ingest batch"),
    "edgefleet_ingest_batch_size": ("histogram", "messages per ingest batch (one commit each)"),
    "edgefleet_rounds_running": ("gauge", "federated runs pending or running"),
    "edgefleet_round_tasks_sent": ("counter", "federated tasks the broker acknowledged"),
    "edgefleet_round_updates": ("counter", "federated updates received"),
    "edgefleet_rollouts_running": ("gauge", "rollouts running"),
    "edgefleet_rollout_chunks_sent": ("counter", "model chunks sent"),
    "edgefleet_leases_held": ("gauge", "round/rollout leases this replica holds"),
    "edgefleet_mqtt_connected": ("gauge", "1 while the controller's broker session is up"),
}

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
BATCH_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class NoMetrics:
    """What the service calls when the endpoint is off: nothing, at no cost."""

    enabled = False

    def message(self, kind: str) -> None: ...
    def duplicate(self, kind: str) -> None: ...
    def reject(self, reason: str) -> None: ...
    def lags(self, lags: list[float]) -> None: ...
    def commit(self, seconds: float, batch: int) -> None: ...
    def close(self) -> None: ...


class Metrics(NoMetrics):
    """The exported series over one private ``CollectorRegistry`` (no process-global state, so
    tests can run several services in one process). ``gauges`` maps a gauge name to a function
    the scrape calls (in the HTTP thread: plain reads of ints the loop thread writes)."""

    enabled = True

    def __init__(self, gauges: dict[str, Callable[[], float]] | None = None,
                 counters: dict[str, Callable[[], float]] | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        self._messages = Counter("edgefleet_messages", METRICS["edgefleet_messages"][1], ["kind"], registry=r)
        self._dups = Counter("edgefleet_duplicates", METRICS["edgefleet_duplicates"][1], ["kind"], registry=r)
        self._rejects = Counter("edgefleet_rejects", METRICS["edgefleet_rejects"][1], ["reason"], registry=r)
        self._lag = Histogram("edgefleet_ingest_lag_seconds", METRICS["edgefleet_ingest_lag_seconds"][1],
                              buckets=LAG_BUCKETS, registry=r)
        self._commit = Histogram("edgefleet_db_commit_seconds", METRICS["edgefleet_db_commit_seconds"][1],
                                 buckets=COMMIT_BUCKETS, registry=r)
        self._batch = Histogram("edgefleet_ingest_batch_size", METRICS["edgefleet_ingest_batch_size"][1],
                                buckets=BATCH_BUCKETS, registry=r)
        self._kinds: dict[str, Any] = {}
        for name, fn in (gauges or {}).items():
            Gauge(name, METRICS[name][1], registry=r).set_function(fn)
        for name, fn in (counters or {}).items():
            _FnCounter(name, METRICS[name][1], fn, r)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- hot path (loop thread) -------------------------------------------------
    def message(self, kind: str) -> None:
        c = self._kinds.get(kind)
        if c is None:
            c = self._kinds[kind] = self._messages.labels(kind)
        c.inc()

    def duplicate(self, kind: str) -> None:
        self._dups.labels(kind).inc()

    def reject(self, reason: str) -> None:
        self._rejects.labels(reason).inc()

    def lags(self, lags: list[float]) -> None:
        obs = self._lag.observe
        for v in lags:
            obs(v if v > 0 else 0.0)

    def commit(self, seconds: float, batch: int) -> None:
        self._commit.observe(seconds)
        self._batch.observe(batch)

    # -- the endpoint -------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (port 0: any free port); returns the port."""
        from prometheus_client import start_http_server

        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        bound = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound)
        return bound

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _FnCounter:
    """A counter whose value is read from the service's own count at scrape time."""

    def __init__(self, name: str, doc: str, fn: Callable[[], float], registry: Any) -> None:
        self.name, self.doc, self.fn = name, doc, fn
        registry.register(self)

    def describe(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily(self.name, self.doc)]

    def collect(self) -> list[Any]:
        from prometheus_client.core import CounterMetricFamily

        return [CounterMetricFamily(self.name, self.doc, value=float(self.fn()))]


def make_metrics(section: "MetricsSection", port_override: int | None = None, **kw: Any) -> NoMetrics:
    """``Metrics`` when the endpoint is on (config or ``--metrics-port``), else ``NoMetrics``;
    a missing prometheus-client is a clear error naming the extra to install."""
    port = section.port if port_override is None else port_override
    if not port:
        return NoMetrics()
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        from .config import ConfigError

        raise ConfigError("metrics.port is set but prometheus-client is not installed "
                          "(pip install 'edgefleet[metrics]')") from None
    return Metrics(**kw)
