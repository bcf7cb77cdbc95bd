"""The versioned topic tree.

Every device owns one subtree, ``{root}/v1/dev/{device_id}/...``, so a broker ACL
can confine a device to its own topics with a ``%c``/``%u`` pattern::

    {root}/v1/dev/{id}/state        retained JSON, online/offline (also the last will)
    {root}/v1/dev/{id}/telemetry    JSON on an interval
    {root}/v1/dev/{id}/events       JSON, one per thing that happened
    {root}/v1/dev/{id}/cmd          JSON commands *to* the device (only the controller may publish)
    {root}/v1/dev/{id}/bin          signed binary frames *to* the device (chunks, federated tasks)
    {root}/v1/dev/{id}/req          requests to the device (e.g. inference) from any client
    {root}/v1/dev/{id}/reply[/...]  the device's replies; requesters pick a suffix
    {root}/v1/dev/{id}/data[/...]   binary payloads from the device (tensors, updates, chunks)
    {root}/v1/dev/{id}/results      JSON inference results / per-interval summaries
    {root}/v1/group/{group}/cmd     commands to every device of a group
    {root}/v1/ctl/state             retained controller state
    {root}/v1/ctl/telemetry         retained: the controller's own figures (ingest, drops, rejects)
    {root}/v1/ctl/desired/{id}      retained: the model version the controller wants there
    {root}/v1/offload/req           offload requests; workers share one subscription

Replies stay inside the replying device's subtree, so the ACL never has to grant a
device write access outside its own topics.
"""
from __future__ import annotations

from dataclasses import dataclass
import re

SCHEMA_VERSION = 1
DEFAULT_ROOT = "edgefleet"
TREE_VERSION = "v1"

# Device/group ids: a wildcard or separator in an id defeats broker ACL patterns.
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
# the same set as a whole-string match: letters, digits and ._:- exclude every case the checks below
# name (wildcards, separators, control characters, '$'), and fullmatch does not let "\n" end it
_ID_FULL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}").fullmatch

DEVICE_LEAVES = ("state", "telemetry", "events", "cmd", "bin", "req", "reply", "data", "results")
# the leaves that may carry binary frames (protocol/binary.py); every other leaf is JSON only, so a
# dashboard subscribed to ``{root}/#`` can skip these by topic (or by the MQTT 5 content type)
BINARY_LEAVES = ("bin", "req", "reply", "data")


class InvalidId(ValueError):
    """A device, group or root id that cannot be used in a topic."""


def validate_id(value: object, what: str = "device id") -> str:
    """Return ``value`` if it is a safe topic level, else raise InvalidId with the reason."""
    if type(value) is str and _ID_FULL(value):   # the common case, once per message on the ingest path
        return value
    if not isinstance(value, str):
        raise InvalidId(f"{what} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidId(f"{what} must not be empty")
    for ch in ("+", "#", "/"):
        if ch in value:
            raise InvalidId(f"{what} {value!r} contains {ch!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise InvalidId(f"{what} {value!r} contains a control character")
    if value.startswith("$"):
        raise InvalidId(f"{what} {value!r} starts with '$' (reserved by brokers)")
    if not _ID_RE.match(value):
        raise InvalidId(
            f"{what} {value!r} must be 1-64 chars of letters, digits, '.', '_', ':' or '-', "
            "starting with a letter or digit")
    return value


def validate_root(root: str) -> str:
    parts = root.split("/")
    for p in parts:
        validate_id(p, "topic root level")
    return root


@dataclass(frozen=True)
class Topics:
    """Topic names under one root. Pure string work; no I/O."""

    root: str = DEFAULT_ROOT

    def __post_init__(self) -> None:
        validate_root(self.root)

    @property
    def base(self) -> str:
        return f"{self.root}/{TREE_VERSION}"

    def device(self, device_id: str, leaf: str, *rest: str) -> str:
        validate_id(device_id)
        if leaf not in DEVICE_LEAVES:
            raise ValueError(f"unknown device leaf {leaf!r}")
        return "/".join((self.base, "dev", device_id, leaf) + rest)

    def state(self, device_id: str) -> str:
        return self.device(device_id, "state")

    def telemetry(self, device_id: str) -> str:
        return self.device(device_id, "telemetry")

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    def cmd(self, device_id: str) -> str:
        return self.device(device_id, "cmd")

    def bin(self, device_id: str) -> str:
        """Controller → device binary frames (signed like commands; the cmd topic stays JSON)."""
        return self.device(device_id, "bin")

    def req(self, device_id: str) -> str:
        return self.device(device_id, "req")

    def reply(self, device_id: str, suffix: str | None = None) -> str:
        return self.device(device_id, "reply", suffix) if suffix else self.device(device_id, "reply")

    def results(self, device_id: str) -> str:
        return self.device(device_id, "results")

    def data(self, device_id: str, *rest: str) -> str:
        return self.device(device_id, "data", *rest)

    def group_cmd(self, group: str) -> str:
        validate_id(group, "group")
        return f"{self.base}/group/{group}/cmd"

    @property
    def ctl_state(self) -> str:
        return f"{self.base}/ctl/state"

    @property
    def ctl_telemetry(self) -> str:
        return f"{self.base}/ctl/telemetry"

    def desired(self, device_id: str) -> str:
        """Retained, controller-written: the bundle version a device should run (dashboards read it)."""
        validate_id(device_id)
        return f"{self.base}/ctl/desired/{device_id}"

    @property
    def offload_req(self) -> str:
        return f"{self.base}/offload/req"

    def all_devices(self, leaf: str) -> str:
        """Subscription filter for one leaf of every device."""
        if leaf not in DEVICE_LEAVES:
            raise ValueError(f"unknown device leaf {leaf!r}")
        return f"{self.base}/dev/+/{leaf}"

    def parse(self, topic: str) -> tuple[str, str, tuple[str, ...]] | None:
        """Split a device topic into (device_id, leaf, rest); None if not a device topic."""
        prefix = self.base + "/dev/"
        if not topic.startswith(prefix):
            return None
        parts = topic[len(prefix):].split("/")
        if len(parts) < 2 or parts[1] not in DEVICE_LEAVES:
            return None
        try:
            validate_id(parts[0])
        except InvalidId:
            return None
        return parts[0], parts[1], tuple(parts[2:])

    def is_own_reply(self, device_id: str, topic: str) -> bool:
        """True if ``topic`` is the device's reply topic or below it (ACL-safe reply_to)."""
        r = self.reply(device_id)
        return topic == r or (topic.startswith(r + "/") and "+" not in topic and "#" not in topic)
