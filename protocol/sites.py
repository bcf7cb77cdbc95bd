"""The site tier's wire contract: which topics cross a site's bridge, and the Mosquitto config for it.

A site (factory, farm, depot) runs its own Mosquitto; its boards connect to it, and one bridge
connection carries what the centre must see (up) and what the boards must get (down). Mosquitto
bridges only what a ``topic`` line names, so everything else stays on the site: that is how the
relay's chunk traffic and the boards' chunk requests to the relay never cross the uplink.

``RULES`` is the one table of those decisions (pattern under ``{root}/v1/``, direction, QoS, why);
``bridge_config`` renders it as a Mosquitto ``connection`` section and docs/sites.md explains each
row. The relay's site-local topics (``relay_*``) are here too, because boards and relay both use
them. Pure string work: no sockets, no files.
"""
from __future__ import annotations

from dataclasses import dataclass
import re

from .topics import DEFAULT_ROOT, TREE_VERSION, InvalidId, validate_id, validate_root

#: directions: ``out`` site → centre, ``in`` centre → site, ``local`` never crosses (documentation
#: and tests: Mosquitto bridges nothing it is not told to)
DIRECTIONS = ("out", "in", "local")


@dataclass(frozen=True)
class BridgeRule:
    """One row of the bridge table. ``pattern`` is below ``{root}/v1/``; ``{site}`` is replaced by the
    site's name (a rule naming one site's subtree)."""
    pattern: str
    direction: str
    qos: int
    why: str

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"bridge rule {self.pattern!r}: direction must be one of {DIRECTIONS}")
        if self.qos not in (0, 1, 2):
            raise ValueError(f"bridge rule {self.pattern!r}: qos must be 0..2")

    def topic(self, root: str, site: str) -> str:
        return f"{root}/{TREE_VERSION}/" + self.pattern.replace("{site}", site)


#: the table (sitefl19 appends its federated-learning rows here)
RULES: list[BridgeRule] = [
    # --- up: what the centre must see of the site's boards
    BridgeRule("dev/+/state", "out", 1, "retained online/offline state and the boards' last wills: the "
               "registry and dashboards at the centre see a board behind the site as if it were direct"),
    BridgeRule("dev/+/telemetry", "out", 1, "interval telemetry (QoS 1 as published; the agent's outbox "
               "holds it while the link is down)"),
    BridgeRule("dev/+/events", "out", 1, "events: model.update steps the rollout runner reads, faults"),
    BridgeRule("dev/+/results", "out", 1, "inference results and summaries"),
    BridgeRule("dev/+/reply/#", "out", 1, "replies to requests made at the centre (FleetClient, fleetctl): "
               "request/response across the bridge; MQTT 5 correlation data and response topic cross"),
    BridgeRule("dev/+/data/xfer", "out", 1, "chunk requests (xfer.want) of boards that fetch from the centre "
               "(no relay, or their relay is gone)"),
    BridgeRule("dev/+/data/cert", "out", 1, "certificate renewal requests"),
    BridgeRule("offload/req", "out", 1, "offload requests to the workers at the centre"),
    BridgeRule("site/{site}/relay/status", "out", 1, "the relay's retained status (cache figures, what it "
               "serves) for the centre's dashboards"),
    # --- down: what the boards must get
    BridgeRule("dev/+/cmd", "in", 1, "signed commands and offers (small JSON); every site hears every "
               "board's commands: they are a few hundred bytes each"),
    BridgeRule("dev/+/bin", "in", 1, "signed binary frames: federated tasks, and chunks for boards that "
               "fetch from the centre; boards served by the relay never ask the centre, so none of these "
               "carry their chunks"),
    BridgeRule("dev/+/req", "in", 1, "requests to a board from clients at the centre (inference, describe)"),
    BridgeRule("dev/+/reply/offload", "in", 1, "offload workers' replies to a board's requests"),
    BridgeRule("group/+/cmd", "in", 1, "commands to a group"),
    BridgeRule("ctl/#", "in", 1, "the controller's retained state and each board's desired version"),
    # --- never crosses
    BridgeRule("site/{site}/relay/want/+", "local", 1, "boards' chunk requests to their relay (xfer.want): "
               "served on the site, never on the uplink"),
    BridgeRule("site/{site}/relay/chunk/+", "local", 1, "chunks the relay serves to each board (unsigned "
               "frames; each board checks every chunk against the hash in the offer the controller signed)"),
    BridgeRule("dev/+/data/fl", "local", 1, "boards' federated updates (and secure-aggregation messages) go "
               "to the site relay's fl component (agent/relay/fl.py): it sends ONE fl.site_update per round "
               "over its own upstream link when the round's strategy can be pre-aggregated, else forwards "
               "each message as it came; a site without a relay's fl component uses FL_DIRECT_RULE"),
    BridgeRule("site/{site}/relay/state", "local", 1, "the relay's retained online/offline (its last will): "
               "how a board knows whether to ask the relay or the centre"),
]

#: for a site with no relay fl component: boards' federated updates cross the bridge one by one
FL_DIRECT_RULE = BridgeRule("dev/+/data/fl", "out", 1, "federated updates straight to the centre (no relay "
                            "aggregates this site's rounds)")


def rules_without_relay_fl(rules: list[BridgeRule] | None = None) -> list[BridgeRule]:
    """The table for a site whose relay does not run the fl component (or that has no relay)."""
    return [FL_DIRECT_RULE if r.pattern == "dev/+/data/fl" else r for r in (RULES if rules is None else rules)]


_CLIENT_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def validate_site(site: object) -> str:
    """A site name is a topic level like a device id (it appears in topics and client ids)."""
    return validate_id(site, "site")


def site_base(root: str, site: str) -> str:
    return f"{root}/{TREE_VERSION}/site/{validate_site(site)}"


def relay_state_topic(root: str, site: str) -> str:
    """Retained on the site broker: ``{"status": "online"|"offline", "relay": id}`` (its will)."""
    return f"{site_base(root, site)}/relay/state"


def relay_status_topic(root: str, site: str) -> str:
    """Retained, crosses up: the relay's figures (cache bytes, chunks served, upstream pulls)."""
    return f"{site_base(root, site)}/relay/status"


def relay_want_topic(root: str, site: str, device_id: str) -> str:
    """Board → relay: ``xfer.want`` for the chunks it lacks (site-local)."""
    return f"{site_base(root, site)}/relay/want/{validate_id(device_id)}"


def relay_chunk_topic(root: str, site: str, device_id: str) -> str:
    """Relay → board: ``xfer.chunk`` frames (unsigned; hash-checked by the board)."""
    return f"{site_base(root, site)}/relay/chunk/{validate_id(device_id)}"


def bridge_topic(root: str, site: str) -> str:
    return f"{site_base(root, site)}/bridge"


def rules_for(direction: str, rules: list[BridgeRule] | None = None) -> list[BridgeRule]:
    return [r for r in (RULES if rules is None else rules) if r.direction == direction]


@dataclass(frozen=True)
class BridgeSettings:
    """What ``fleetctl site bridge-config`` was given; validated so the config we write is usable."""
    site: str
    centre: str = "127.0.0.1:1883"     # host:port of the central broker (or of the site's uplink)
    root: str = DEFAULT_ROOT
    tls_ca: str = ""
    cert: str = ""
    key: str = ""
    keepalive_s: int = 30
    restart_timeout: tuple[int, int] = (2, 30)   # Mosquitto's jittered back-off: base, cap (s)
    #: the site's boards: when given, the per-board downlink rules (``dev/+/…`` in) name each board
    #: instead of ``+``, so no other site's commands and chunks cross this uplink (regenerate the
    #: config and restart the site broker when boards join or leave the site)
    boards: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        try:
            validate_site(self.site)
            validate_root(self.root)
        except InvalidId as exc:
            raise ValueError(str(exc)) from None
        host, sep, port = self.centre.rpartition(":")
        if not sep or not host or not port.isdigit() or not (0 < int(port) < 65536):
            raise ValueError(f"centre {self.centre!r} must be HOST:PORT (port 1..65535)")
        if any(c.isspace() for c in self.centre):
            raise ValueError(f"centre {self.centre!r} must not contain spaces")
        if bool(self.cert) != bool(self.key):
            raise ValueError("--cert and --key go together")
        if self.cert and not self.tls_ca:
            raise ValueError("--cert/--key need --tls-ca (the centre's CA)")
        for name, v in (("tls-ca", self.tls_ca), ("cert", self.cert), ("key", self.key)):
            if any(c in v for c in "\n\r"):
                raise ValueError(f"--{name} must be one line")
        if not (5 <= self.keepalive_s <= 3600):
            raise ValueError("keepalive must be 5..3600 s")
        if not (1 <= self.restart_timeout[0] <= self.restart_timeout[1]):
            raise ValueError("restart timeout must be 1 <= base <= cap")
        for b in self.boards:
            try:
                validate_id(b, "board id")
            except InvalidId as exc:
                raise ValueError(str(exc)) from None

    @property
    def connection(self) -> str:
        return f"edgefleet-site-{self.site}"

    @property
    def remote_clientid(self) -> str:
        """One per site: the centre keeps this client's session (cleansession false), so what was
        queued for the site while the uplink was down is delivered when it is back."""
        return f"edgefleet-bridge-{self.site}"


def bridge_config(s: BridgeSettings, rules: list[BridgeRule] | None = None) -> str:
    """The Mosquitto ``connection`` section for site ``s.site`` (append it to the site's mosquitto.conf)."""
    table = RULES if rules is None else rules
    base, cap = s.restart_timeout
    lines = [
        f"# edgefleet site bridge for {s.site} (fleetctl site bridge-config; rules: docs/sites.md)",
        f"connection {s.connection}",
        f"address {s.centre}",
        f"remote_clientid {s.remote_clientid}",
        f"local_clientid edgefleet-bridge-local-{s.site}",
        "bridge_protocol_version mqttv50",
        # the centre keeps the bridge's subscriptions and queues QoS 1 messages while the uplink is
        # down; the site keeps its side too
        "cleansession false",
        "local_cleansession false",
        f"keepalive_interval {s.keepalive_s}",
        f"restart_timeout {base} {cap}",
        "start_type automatic",
        # retained state (online/offline, desired versions) must keep its retain flag across
        "bridge_outgoing_retain true",
        "notifications true",
        f"notification_topic {bridge_topic(s.root, s.site)}",
    ]
    if s.tls_ca:
        lines.append(f"bridge_cafile {s.tls_ca}")
        lines.append("bridge_insecure false")
    if s.cert:
        lines += [f"bridge_certfile {s.cert}", f"bridge_keyfile {s.key}"]
    for r in table:
        if r.direction == "local":
            lines.append(f"# stays on the site: {r.topic(s.root, s.site)}")
            continue
        if r.direction == "in" and s.boards and r.pattern.startswith("dev/+/"):
            for b in s.boards:
                lines.append(f"topic {r.topic(s.root, s.site).replace('/dev/+/', f'/dev/{b}/', 1)} in {r.qos}")
            continue
        lines.append(f"topic {r.topic(s.root, s.site)} {r.direction} {r.qos}")
    return "\n".join(lines) + "\n"


# -- the relay's one message kind of its own -----------------------------------------------------
def _check_unavailable(body: dict) -> None:
    from .envelope import DecodeError, _req

    tid = _req(body, "transfer_id", str)
    if not (0 < len(tid) <= 64):
        raise DecodeError("field", "must be 1-64 chars", "body.transfer_id")
    _req(body, "reason", str)


def _register() -> None:
    from .envelope import register_kind

    #: relay → board (site-local): "I cannot serve this transfer, ask the centre" (with the reason)
    register_kind("xfer.unavailable", _check_unavailable)


_register()
