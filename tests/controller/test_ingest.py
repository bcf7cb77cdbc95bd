"""Controller ingestion of bad input: pure (no broker), straight into a real SQLite registry."""
import json

import pytest

from controller.config import parse_config
from controller.registry import Registry
from controller.service import ControllerService
from protocol.envelope import Envelope, encode
from protocol.mqttlink import Message

T = "edgefleet/v1/dev"


@pytest.fixture
def svc(tmp_path):
    cfg = parse_config({"registry": {"path": str(tmp_path / "r.db")}, "mqtt": {"max_message_bytes": 4096}})
    return ControllerService(cfg)


def tele(sender="pi-1", seq=1, **kw):
    return encode(Envelope(kind="telemetry", sender=sender, body={"seq": seq, "interval_s": 1, "cpu_percent": 3.0},
                           **kw))


def test_good_messages_land(svc):
    svc.ingest(Message(f"{T}/pi-1/state", encode(Envelope(kind="state", sender="pi-1", body={"status": "online"}))))
    svc.ingest(Message(f"{T}/pi-1/telemetry", tele()))
    svc.registry.commit()
    d = svc.registry.device("pi-1")
    assert d.online and d.telemetry["cpu_percent"] == 3.0
    assert svc.registry.rejects() == {}


@pytest.mark.parametrize("topic,payload,reason", [
    (f"{T}/pi-1/telemetry", b"{oops", "bad_json"),
    (f"{T}/pi-1/telemetry", json.dumps({"schema": 9}).encode(), "schema"),
    (f"{T}/pi-1/telemetry", encode(Envelope(kind="cmd", sender="pi-1", body={"command": "x"})), "kind_topic_mismatch"),
    (f"{T}/pi-1/telemetry", tele(sender="pi-2"), "sender_mismatch"),
    (f"{T}/pi-1/telemetry", b" " * 5000, "oversize"),
    (f"{T}/pi-1/events", json.dumps({"schema": 1, "kind": "nope", "id": "a", "sender": "pi-1", "ts": 1}).encode(),
     "unknown_kind"),
    ("edgefleet/v1/dev/a+b/telemetry", tele(), "bad_topic"),
], ids=["bad_json", "schema", "kind_topic_mismatch", "sender_mismatch", "oversize", "unknown_kind", "bad_topic"])
# (named by the reason: the payloads hold random ids, and parallel workers must collect the same names)
def test_bad_input_rejected_counted_and_nothing_else_lost(svc, topic, payload, reason):
    svc.ingest(Message(f"{T}/pi-1/telemetry", tele(seq=1)))
    assert svc.ingest(Message(topic, payload)) is None
    svc.ingest(Message(f"{T}/pi-1/telemetry", tele(seq=2)))
    svc.registry.commit()
    assert svc.registry.rejects() == {reason: 1}
    assert [r["body"]["seq"] for r in svc.registry.telemetry("pi-1")] == [1, 2]


def test_duplicate_message_ids_stored_once(svc):
    payload = tele(seq=7)
    svc.ingest(Message(f"{T}/pi-1/telemetry", payload))
    svc.ingest(Message(f"{T}/pi-1/telemetry", payload))
    svc.registry.commit()
    assert svc.registry.telemetry_count("pi-1") == 1
    assert svc.counts["duplicates"] == 1


def test_lwt_offline_after_online(svc):
    on = encode(Envelope(kind="state", sender="pi-1", body={"status": "online", "capabilities": {"cores": 4}}))
    off = encode(Envelope(kind="state", sender="pi-1", body={"status": "offline"}, ts=1.0))  # will built long ago
    svc.ingest(Message(f"{T}/pi-1/state", on))
    svc.ingest(Message(f"{T}/pi-1/state", off))
    svc.registry.commit()
    d = svc.registry.device("pi-1")
    assert d.online is False
    assert d.state["capabilities"] == {"cores": 4}  # the last online state is kept for display


def test_registry_readonly_requires_existing_file(tmp_path):
    from controller.registry import RegistryError

    with pytest.raises(RegistryError, match="no registry"):
        Registry(tmp_path / "missing.db", readonly=True)
