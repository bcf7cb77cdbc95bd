"""The agent's config: one frozen, typed object loaded from TOML.

Every field has a default, so the smallest valid file is::

    [device]
    id = "pi-07"

Loading has no side effects; ``load_config`` raises ``ConfigError`` naming the key.
Environment overrides come from the CLI (``EDGE_AGENT_*``), not from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from protocol.config_loader import ConfigError, build, check, load_toml, one_of
from protocol.mqttlink import MqttSettings
from protocol.topics import InvalidId, validate_id, validate_root

from ..relay import RelayConfig

__all__ = ["AgentConfig", "ConfigError", "load_config", "parse_config"]


@dataclass(frozen=True)
class DeviceSection:
    id: str = ""
    group: str = "default"
    location: str = ""
    site: str = ""                   # the site (factory, farm, depot) whose broker the board is behind

    def __post_init__(self) -> None:
        check(bool(self.id), "device.id", "is required (a unique id per board, e.g. 'pi-07')")
        for key, val in (("device.id", self.id), ("device.group", self.group),
                         *((("device.site", self.site),) if self.site else ())):
            try:
                validate_id(val, key)
            except InvalidId as exc:
                raise ConfigError(str(exc)) from None


@dataclass(frozen=True)
class TelemetrySection:
    interval_s: float = 10.0
    disk_path: str = "/"

    def __post_init__(self) -> None:
        check(0.1 <= self.interval_s <= 86400, "telemetry.interval_s", f"must be 0.1..86400, got {self.interval_s}")


@dataclass(frozen=True)
class HomeAssistantSection:
    enabled: bool = True
    prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        try:
            validate_root(self.prefix)
        except InvalidId as exc:
            raise ConfigError(f"homeassistant.prefix: {exc}") from None


@dataclass(frozen=True)
class StateSection:
    dir: str = "/var/lib/edgefleet"
    outbox_bytes: int = 16 << 20     # on-disk outbox for what cannot be sent now

    def __post_init__(self) -> None:
        check(64 << 10 <= self.outbox_bytes <= 4 << 30, "state.outbox_bytes", "must be 64 KiB..4 GiB")


@dataclass(frozen=True)
class ModelSection:
    bundle: str = ""                 # a bundle directory to install at start-up (the board's first model)
    threads: int = 1                 # runtime intra-op threads
    providers: tuple[str, ...] = ()  # ONNX Runtime execution providers (default CPU)
    keep_versions: int = 3           # installed versions kept for rollback
    max_transfer_bytes: int = 1 << 30   # largest patch this board accepts over the air
    transfer_window: int = 64        # most chunks asked for at once (the window adapts up to it)
    transfer_retry_s: float = 3.0    # ask again for a chunk not seen after this long
    relay_stall_s: float = 15.0      # behind a site relay: no chunk from it this long -> ask the centre
    shadow_live_samples: int = 0     # >0: before switching, run the new version beside the old on this
    shadow_live_window_s: float = 30.0   # ... many live inputs (waiting up to this long for them)
    shadow_min_agreement: float = 0.9    # ... and refuse it when it agrees on fewer labels than this

    def __post_init__(self) -> None:
        check(1 <= self.threads <= 64, "model.threads", f"must be 1..64, got {self.threads}")
        check(1 << 10 <= self.max_transfer_bytes <= 2 << 30, "model.max_transfer_bytes", "must be 1 KiB..2 GiB")
        check(1 <= self.transfer_window <= 64, "model.transfer_window", f"must be 1..64, got {self.transfer_window}")
        check(0.1 <= self.transfer_retry_s <= 600, "model.transfer_retry_s", "must be 0.1..600 s")
        check(0.5 <= self.relay_stall_s <= 3600, "model.relay_stall_s", "must be 0.5..3600 s")
        check(0 <= self.shadow_live_samples <= 100000, "model.shadow_live_samples", "must be 0..100000")
        check(0 < self.shadow_live_window_s <= 86400, "model.shadow_live_window_s", "must be in (0, 86400]")
        check(0 <= self.shadow_min_agreement <= 1, "model.shadow_min_agreement", "must be in [0, 1]")
        check(2 <= self.keep_versions <= 20, "model.keep_versions", f"must be 2..20, got {self.keep_versions}")


@dataclass(frozen=True)
class InferenceSection:
    source: str = "none"             # none | replay | stdin
    replay_x: str = ""               # .npy [n, ...] or .csv (optional trailing 'label' column)
    replay_y: str = ""               # optional labels .npy
    rate_hz: float = 5.0
    loop: bool = True
    results: str = "summary"         # every | summary | off
    results_interval_s: float = 10.0
    max_results_per_s: float = 20.0
    # a binary tensor request (e.g. a 224x224x3 uint8 image is 147 KiB) larger than this is
    # refused with an ``oversize`` error reply; JSON requests stay under mqtt.max_message_bytes
    max_request_bytes: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        one_of(self.source, ("none", "replay", "stdin"), "inference.source")
        check(1024 <= self.max_request_bytes <= 256 * 1024 * 1024, "inference.max_request_bytes",
              f"must be 1 KiB..256 MiB, got {self.max_request_bytes}")
        check(self.source != "replay" or bool(self.replay_x), "inference.replay_x", "is required for source = replay")
        check(0 <= self.rate_hz <= 100000, "inference.rate_hz", "must be 0..100000 (0 = as fast as possible)")
        one_of(self.results, ("every", "summary", "off"), "inference.results")
        check(self.results_interval_s > 0, "inference.results_interval_s", "must be > 0")
        check(self.max_results_per_s > 0, "inference.max_results_per_s", "must be > 0")


@dataclass(frozen=True)
class LearningSection:
    enabled: bool = False            # adapt the head on this board from labelled data
    trigger: str = "every_n"         # every_n | drift | command
    every_n: int = 50
    optimizer: str = "sgd"           # sgd | adam
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    max_steps: int = 200             # per training cycle
    budget_s: float = 2.0            # wall time per cycle
    cpu_fraction: float = 0.25       # share of wall time training may take (paces each cycle too)
    buffer_bytes: int = 2 << 20      # replay buffer of features, in bytes
    policy: str = "class_balanced"   # class_balanced | reservoir
    holdout_every: int = 5
    min_holdout: int = 10
    min_train: int = 20
    adopt_margin: float = 0.0
    pending_max: int = 2048          # unlabelled requests kept for later feedback
    pending_ttl_s: float = 600.0
    federated: bool = True           # take part in federated rounds
    personalize: bool = False        # keep a per-board last layer on top of the global body (FedPer);
                                     # serve it only when it beats the global head on the holdout
    personal_steps: int = 100        # fine-tuning steps of the personal layer per new global head
    isolate: str = "process"         # process: train in a short-lived child (inference keeps its latency)

    def __post_init__(self) -> None:
        one_of(self.trigger, ("every_n", "drift", "command"), "learning.trigger")
        one_of(self.optimizer, ("sgd", "adam"), "learning.optimizer")
        one_of(self.policy, ("class_balanced", "reservoir"), "learning.policy")
        one_of(self.isolate, ("process", "thread"), "learning.isolate")
        check(0 < self.lr < 10, "learning.lr", "must be in (0, 10)")
        check(0 < self.cpu_fraction <= 1, "learning.cpu_fraction", "must be in (0, 1]")
        check(4096 <= self.buffer_bytes <= 1 << 30, "learning.buffer_bytes", "must be 4 KiB..1 GiB")
        check(self.every_n >= 1 and self.max_steps >= 1 and self.batch_size >= 1, "learning",
              "every_n, max_steps and batch_size must be >= 1")
        check(self.holdout_every >= 2, "learning.holdout_every", "must be >= 2")
        check(self.budget_s > 0, "learning.budget_s", "must be > 0")
        check(1 <= self.personal_steps <= 100000, "learning.personal_steps", "must be 1..100000")


@dataclass(frozen=True)
class OffloadSection:
    enabled: bool = False
    threshold: float = 0.8           # offload when the local confidence is below this
    mode: str = "features"           # features (split computing) | raw
    deadline_ms: float = 200.0       # default per-request deadline
    margin_ms: float = 5.0

    def __post_init__(self) -> None:
        check(0 <= self.threshold <= 1, "offload.threshold", "must be in [0, 1]")
        one_of(self.mode, ("features", "raw"), "offload.mode")
        check(self.deadline_ms > 0, "offload.deadline_ms", "must be > 0")
        check(self.margin_ms >= 0, "offload.margin_ms", "must be >= 0")


@dataclass(frozen=True)
class SecuritySection:
    trusted_keys: tuple[str, ...] = ()       # controller Ed25519 public keys (PEM files)
    require_signed_commands: str = "auto"    # auto = required as soon as a trusted key is configured
    max_command_skew_s: float = 300.0

    def __post_init__(self) -> None:
        one_of(self.require_signed_commands, ("auto", "yes", "no"), "security.require_signed_commands")
        check(self.require_signed_commands != "yes" or bool(self.trusted_keys), "security.trusted_keys",
              "must list at least one key when require_signed_commands = \"yes\"")
        check(self.max_command_skew_s > 0, "security.max_command_skew_s", "must be > 0")

    @property
    def require_signed(self) -> bool:
        return self.require_signed_commands == "yes" or (self.require_signed_commands == "auto"
                                                          and bool(self.trusted_keys))


@dataclass(frozen=True)
class ProvisioningSection:
    """Claim and rotation of the board's own certificate (docs/provisioning.md).

    With ``claim_cert``/``claim_key`` set and no ``mqtt.cert_file`` on disk yet, the agent first
    claims an identity with the fleet-wide claim credential and writes its own key and certificate
    to ``mqtt.key_file``/``mqtt.cert_file``; with ``rotate`` it renews at ``renew_at`` of the lifetime."""
    claim_cert: str = ""
    claim_key: str = ""
    tags: tuple[str, ...] = ()
    rotate: bool = True
    renew_at: float = 2 / 3
    answer_timeout_s: float = 20.0   # a renewal unanswered this long is sent again
    connect_timeout_s: float = 20.0  # the new certificate must connect within this, else the old stays

    def __post_init__(self) -> None:
        check(bool(self.claim_cert) == bool(self.claim_key), "provisioning.claim_cert",
              "and provisioning.claim_key go together")
        check(0.1 <= self.renew_at <= 0.95, "provisioning.renew_at", "must be in [0.1, 0.95]")
        check(self.answer_timeout_s > 0, "provisioning.answer_timeout_s", "must be > 0")
        check(self.connect_timeout_s > 0, "provisioning.connect_timeout_s", "must be > 0")


@dataclass(frozen=True)
class BridgeSection:
    """A sensor MCU on a serial port (firmware_bridge, wired in by agent.mcu); off unless enabled."""
    enabled: bool = False
    port: str = ""                   # /dev/ttyUSB0, or better a stable /dev/serial/by-id/... link
    baud: int = 115200
    queue_size: int = 64             # sensor frames waiting for inference
    policy: str = "drop_oldest"      # drop_oldest | drop_newest when that queue is full (counted)
    max_frame: int = 1024            # offered in HELLO_ACK; the smaller of ours and the MCU's is used
    push_chunk_bytes: int = 512      # model push: bytes per MODEL_CHUNK (capped by the frame size)
    push_retries: int = 5            # resends of one chunk before a push fails
    push_ack_timeout_s: float = 0.0  # 0: two frame times at this baud + 0.25 s
    offline_after_s: float = 30.0    # the MCU counts as offline after this long without a frame

    def __post_init__(self) -> None:
        check(not self.enabled or bool(self.port), "bridge.port", "is required when bridge.enabled = true")
        check(300 <= self.baud <= 12_000_000, "bridge.baud", f"must be 300..12000000, got {self.baud}")
        check(1 <= self.queue_size <= 65536, "bridge.queue_size", f"must be 1..65536, got {self.queue_size}")
        one_of(self.policy, ("drop_oldest", "drop_newest"), "bridge.policy")
        check(64 <= self.max_frame <= 65535, "bridge.max_frame", f"must be 64..65535, got {self.max_frame}")
        check(1 <= self.push_chunk_bytes <= 65519, "bridge.push_chunk_bytes", "must be 1..65519")
        check(0 <= self.push_retries <= 100, "bridge.push_retries", f"must be 0..100, got {self.push_retries}")
        check(0 <= self.push_ack_timeout_s <= 60, "bridge.push_ack_timeout_s", "must be 0..60 (0 = from the baud)")
        check(0 < self.offline_after_s <= 86400, "bridge.offline_after_s", "must be in (0, 86400]")


@dataclass(frozen=True)
class AgentConfig:
    bridge: BridgeSection = field(default_factory=BridgeSection)   # sensor MCU (firmware_bridge)
    device: DeviceSection = field(default_factory=DeviceSection)
    mqtt: MqttSettings = field(default_factory=MqttSettings)
    telemetry: TelemetrySection = field(default_factory=TelemetrySection)
    homeassistant: HomeAssistantSection = field(default_factory=HomeAssistantSection)
    state: StateSection = field(default_factory=StateSection)
    security: SecuritySection = field(default_factory=SecuritySection)
    model: ModelSection = field(default_factory=ModelSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    learning: LearningSection = field(default_factory=LearningSection)
    offload: OffloadSection = field(default_factory=OffloadSection)
    provisioning: ProvisioningSection = field(default_factory=ProvisioningSection)
    relay: RelayConfig = field(default_factory=RelayConfig)   # the site-gateway role (agent/relay)
    source: str = ""  # where it was loaded from, for messages

    @property
    def state_dir(self) -> Path:
        return Path(self.state.dir)


def parse_config(table: dict[str, Any], source: str = "<dict>") -> AgentConfig:
    if "device" not in table:
        raise ConfigError("[device] section with id = \"...\" is required")
    cfg = build(AgentConfig, {k: v for k, v in table.items() if k != "source"})
    check(not cfg.relay.enabled or bool(cfg.device.site), "device.site",
          "is required when relay.enabled = true (the site this relay serves)")
    return replace(cfg, source=source)


def load_config(path: str | Path, overrides: dict[str, dict[str, Any]] | None = None) -> AgentConfig:
    """Load and validate; ``overrides`` ({section: {key: value}}) win over the file."""
    table = load_toml(path)
    for section, values in (overrides or {}).items():
        table.setdefault(section, {})
        if not isinstance(table[section], dict):
            raise ConfigError(f"{section} must be a table")
        table[section].update(values)
    return parse_config(table, str(path))
