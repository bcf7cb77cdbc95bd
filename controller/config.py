"""The controller's config: one frozen, typed object loaded from TOML (all optional)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
import os
from pathlib import Path
from typing import Any

from protocol.config_loader import ConfigError, build, check, load_toml
from protocol.mqttconf import MqttSettings
from protocol.topics import InvalidId, validate_id

__all__ = ["ControllerConfig", "ConfigError", "load_config", "default_db_path"]


def default_db_path() -> str:
    if os.geteuid() == 0 and Path("/var/lib/edgefleet").is_dir():
        return "/var/lib/edgefleet/controller.db"
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(base, "edgefleet", "controller.db")


@dataclass(frozen=True)
class ControllerSection:
    id: str = "controller"
    offline_after_s: float = 0.0  # >0: mark silent devices offline after this long (LWT covers the rest)
    offload_auto_tune: bool = False   # adjust devices' offload thresholds from worker load (offload_tuning.py)
    offload_tune_interval_s: float = 30.0
    rollout_max_bytes_per_s: int = 0  # cap on model chunks sent, all devices together (0 = no cap)
    #: this replica's name when several `fleetctl serve` share one fleet (MQTT 5 shared subscriptions,
    #: leases in the registry: controller/lease.py); empty = the only controller
    replica: str = ""
    lease_ttl_s: float = 10.0   # a dead replica's rounds and rollouts are taken over after this long
    telemetry_interval_s: float = 10.0   # the controller's own figures on ctl/telemetry and in the registry

    def __post_init__(self) -> None:
        try:
            validate_id(self.id, "controller.id")
            if self.replica:
                validate_id(self.replica, "controller.replica")
        except InvalidId as exc:
            raise ConfigError(str(exc)) from None
        check(1.0 <= self.lease_ttl_s <= 600, "controller.lease_ttl_s", "must be 1..600 s")
        check(self.offline_after_s >= 0, "controller.offline_after_s", "must be >= 0")
        check(self.telemetry_interval_s >= 0.1, "controller.telemetry_interval_s", "must be >= 0.1")
        check(self.rollout_max_bytes_per_s == 0 or self.rollout_max_bytes_per_s >= 4096,
              "controller.rollout_max_bytes_per_s", "must be 0 (no cap) or at least 4096")


@dataclass(frozen=True)
class RegistrySection:
    """``url``: ``postgresql://user@host/db`` (production), ``sqlite:///path`` or a plain path (embedded,
    the default); ``path`` is the older name of the same setting. Retention is per device, by count
    and by age (0: no age limit). ``artifacts_dir``: where rollout artifacts and run files live
    (default: beside an SQLite file; with PostgreSQL, the state directory)."""
    path: str = ""
    url: str = ""
    telemetry_keep_per_device: int = 1000
    events_keep_per_device: int = 1000
    telemetry_max_age_s: float = 30 * 86400.0
    events_max_age_s: float = 90 * 86400.0
    artifacts_dir: str = ""
    batch_max: int = 500      # the writer commits at most this many messages at once…
    flush_ms: float = 50.0    # …or this long after the first one waiting

    def __post_init__(self) -> None:
        from .db import parse_url

        check(self.telemetry_keep_per_device >= 1, "registry.telemetry_keep_per_device", "must be >= 1")
        check(self.events_keep_per_device >= 1, "registry.events_keep_per_device", "must be >= 1")
        check(self.telemetry_max_age_s >= 0, "registry.telemetry_max_age_s", "must be >= 0 (0 = no age limit)")
        check(self.events_max_age_s >= 0, "registry.events_max_age_s", "must be >= 0 (0 = no age limit)")
        check(1 <= self.batch_max <= 10000, "registry.batch_max", "must be 1-10000")
        check(0 < self.flush_ms <= 10000, "registry.flush_ms", "must be > 0 and <= 10000")
        check(not (self.url and self.path and self.url != self.path), "registry.url",
              "and registry.path name two registries: set one")
        try:
            parse_url(self.url or self.path or "x")
        except ValueError as exc:
            raise ConfigError(f"registry.url: {exc}") from None


@dataclass(frozen=True)
class MetricsSection:
    """The Prometheus endpoint of `fleetctl serve` (controller/metrics.py): off unless ``port`` is set."""

    port: int = 0
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        check(0 <= self.port <= 65535, "metrics.port", f"must be 0 (off) or a TCP port, got {self.port}")
        check(bool(self.host), "metrics.host", "must not be empty")


@dataclass(frozen=True)
class SecuritySection:
    signing_key: str = ""   # Ed25519 private key (PEM) that signs commands and patches

@dataclass(frozen=True)
class ProvisioningSection:
    """Claims and certificate renewals (docs/provisioning.md); off unless enabled."""
    enabled: bool = False
    ca_dir: str = ""                          # the fleet CA (fleetctl certs init) that signs devices
    cert_lifetime_s: float = 90 * 86400.0     # devices renew at 2/3 of it
    auto_accept: tuple[str, ...] = ()         # device-id globs accepted without an operator
    auto_accept_tags: tuple[str, ...] = ()    # ... or claims carrying one of these tags
    max_claim_bytes: int = 16384
    max_skew_s: float = 300.0

    def __post_init__(self) -> None:
        check(not self.enabled or bool(self.ca_dir), "provisioning.ca_dir", "is required when enabled")
        check(10 <= self.cert_lifetime_s <= 36500 * 86400, "provisioning.cert_lifetime_s", "must be 10 s..100 years")
        check(1024 <= self.max_claim_bytes <= 1 << 20, "provisioning.max_claim_bytes", "must be 1 KiB..1 MiB")
        check(self.max_skew_s > 0, "provisioning.max_skew_s", "must be > 0")


@dataclass(frozen=True)
class CliSection:
    """The CLI's own broker identity (``fleetctl cmd``, ``infer``, ``telemetry --follow``, …).

    The shipped Mosquitto config names every connection after its certificate or user
    (``use_username_as_clientid``), so the CLI must not connect as the controller: that would push
    ``fleetctl serve`` off the broker. Give it an operator certificate (mTLS) or user (passwords);
    the ``[mqtt]`` section's broker, CA and topic root still apply (controller/link.py)."""

    cert_file: str = ""
    key_file: str = ""
    username: str = ""
    password_file: str = ""

    def __post_init__(self) -> None:
        check(bool(self.cert_file) == bool(self.key_file), "cli.cert_file",
              "and cli.key_file go together (the operator's certificate and its key)")


@dataclass(frozen=True)
class ControllerConfig:
    controller: ControllerSection = field(default_factory=ControllerSection)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    registry: RegistrySection = field(default_factory=RegistrySection)
    security: SecuritySection = field(default_factory=SecuritySection)
    cli: CliSection = field(default_factory=CliSection)
    provisioning: ProvisioningSection = field(default_factory=ProvisioningSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    source: str = ""

    @property
    def db_path(self) -> str:
        """The registry URL (or SQLite path) in use."""
        return self.registry.url or self.registry.path or default_db_path()

    @property
    def db_is_sqlite(self) -> bool:
        from .db import parse_url

        return parse_url(self.db_path).backend == "sqlite"

    @property
    def state_dir(self) -> Path:
        """Where artifacts and run files go: ``registry.artifacts_dir``'s parent, else beside an SQLite
        registry, else the default state directory."""
        from .db import parse_url

        if self.registry.artifacts_dir:
            return Path(self.registry.artifacts_dir).parent
        u = parse_url(self.db_path)
        return Path(u.target).parent if u.backend == "sqlite" else Path(default_db_path()).parent

    @property
    def artifacts_dir(self) -> Path:
        return Path(self.registry.artifacts_dir) if self.registry.artifacts_dir else self.state_dir / "artifacts"


def parse_config(table: dict[str, Any], source: str = "<dict>") -> ControllerConfig:
    return replace(build(ControllerConfig, table), source=source)


def load_config(path: str | Path | None, overrides: dict[str, dict[str, Any]] | None = None) -> ControllerConfig:
    table: dict[str, Any] = load_toml(path) if path else {}
    for section, values in (overrides or {}).items():
        table.setdefault(section, {}).update(values)
    return parse_config(table, str(path) if path else "<defaults>")
