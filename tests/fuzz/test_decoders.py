"""Fuzz every inbound decoder: zero unhandled exceptions.

Default suite: a few hundred inputs per decoder. Dedicated run (>= 10,000 each):

    EDGEFLEET_FUZZ=10000 python -m pytest -q --timeout 0 tests/fuzz
"""
from __future__ import annotations

import json
import os

from hypothesis import HealthCheck, given, settings, strategies as st

from agent.core.config import ConfigError as AgentConfigError, parse_config as parse_agent
from controller.config import ConfigError as CtlConfigError, parse_config as parse_ctl
from controller.config import parse_config
from controller.service import ControllerService
import protocol.rollout  # noqa: F401 - registers the rollout kinds
from protocol.binary import decode_frame, encode_frame
from protocol.chunks import ChunkError, ChunkManifest
from protocol.config_loader import ConfigError, load_toml
from protocol.envelope import DecodeError, Envelope, decode, encode
from protocol.mqttlink import Message

N = int(os.environ.get("EDGEFLEET_FUZZ", "300"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck))

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                           max_size=4), max_leaves=12)
KINDS = st.sampled_from(["state", "telemetry", "event", "cmd", "reply", "infer.request", "ctl.state", "x",
                         "model.offer", "xfer.want", "xfer.chunk"])


@st.composite
def near_envelopes(draw):
    """Mostly-valid envelopes with one field perturbed: reaches deep into body validators."""
    env = {"schema": 1, "kind": draw(KINDS), "id": "abc", "sender": "pi-1", "ts": 1.0,
           "body": draw(st.dictionaries(st.sampled_from(["status", "seq", "interval_s", "event", "level", "command",
                                                         "args", "ok", "error", "x", "label", "deadline_ms",
                                                         "target", "base", "transfer", "transfer_id", "chunks",
                                                         "index", "rollout_id"]),
                                        json_values, max_size=5))}
    if draw(st.booleans()):
        env[draw(st.sampled_from(list(env) + ["reply_to", "corr", "auth"]))] = draw(json_values)
    return json.dumps(env).encode()


@FUZZ
@given(st.one_of(st.binary(max_size=300), near_envelopes()))
def test_envelope_decoder(payload):
    try:
        decode(payload)
    except DecodeError:
        pass


@FUZZ
@given(st.binary(max_size=200), st.integers(0, 500), st.integers(0, 255))
def test_binary_frame_decoder(data, pos, val):
    import numpy as np

    good = bytearray(encode_frame(Envelope(kind="state", sender="pi-1", body={"status": "online"}),
                                  {"w": np.ones((2, 3), np.float32)}, b"blob"))
    good[pos % len(good)] = val
    for payload in (bytes(good), b"EF\x01\x00" + data, data):
        try:
            decode_frame(payload)
        except DecodeError:
            pass


@FUZZ
@given(st.dictionaries(st.sampled_from(["transfer_id", "total_size", "chunk_size", "sha256", "chunk_sha256"]),
                       json_values))
def test_chunk_manifest_decoder(d):
    try:
        ChunkManifest.from_dict(d)
    except ChunkError:
        pass


sections = st.sampled_from(["device", "mqtt", "telemetry", "homeassistant", "state", "security", "controller",
                            "registry", "bogus"])


@FUZZ
@given(st.dictionaries(sections, st.one_of(json_values, st.dictionaries(st.text(max_size=15), json_values, max_size=4)),
                       max_size=4))
def test_config_decoders(table):
    for parse, err in ((parse_agent, AgentConfigError), (parse_ctl, CtlConfigError)):
        try:
            parse(table)
        except err:
            pass


@FUZZ
@given(st.binary(max_size=300))
def test_toml_files(tmp_path_factory, raw):
    p = tmp_path_factory.mktemp("cfg") / "c.toml"
    p.write_bytes(raw)
    try:
        load_toml(p)
    except ConfigError:
        pass


def test_controller_ingest_survives_every_topic(tmp_path):
    """Each ingested topic's payloads, through the service's own entry point."""
    svc = ControllerService(parse_config({"registry": {"path": str(tmp_path / "r.db")}}))

    @FUZZ
    @given(st.sampled_from(["state", "telemetry", "events", "reply", "cmd", "bogus", "data/fl", "data/x",
                                            "data/xfer"]),
           st.one_of(st.binary(max_size=200), near_envelopes()))
    def inner(leaf, payload):
        svc.ingest(Message(f"edgefleet/v1/dev/pi-1/{leaf}", payload))

    inner()
    svc.registry.commit()
    assert svc.counts["rejected"] > 0


def test_agent_handler_survives_every_topic(tmp_path):
    """Each inbound agent topic (cmd, req, group cmd, HA birth), through Agent.handle_message."""
    import asyncio

    from agent.app import Agent

    agent = Agent(parse_agent({"device": {"id": "pi-1"}, "state": {"dir": str(tmp_path)}}))
    agent.start()
    topics = ["edgefleet/v1/dev/pi-1/cmd", "edgefleet/v1/dev/pi-1/req", "edgefleet/v1/group/default/cmd",
              "homeassistant/status"]
    loop = asyncio.new_event_loop()

    @FUZZ
    @given(st.sampled_from(topics), st.one_of(st.binary(max_size=200), near_envelopes()))
    def inner(topic, payload):
        loop.run_until_complete(agent.handle_message(Message(topic, payload)))

    try:
        inner()
    finally:
        loop.close()
    assert sum(agent.counters.rejected.values()) > 0


manifest_keys = st.sampled_from(["name", "version", "files", "input", "features", "labels", "reference", "eval",
                                 "metrics", "parent_version"])


@FUZZ
@given(st.dictionaries(manifest_keys, json_values, max_size=8))
def test_bundle_manifest_decoder(d):
    from protocol.bundle import BundleError, parse_manifest

    try:
        parse_manifest(d)
    except BundleError:
        pass


@FUZZ
@given(st.binary(max_size=400), st.integers(0, 5000), st.integers(0, 255))
def test_patch_decoder(data, pos, val):
    from protocol.patch import PatchError, verify_patch
    from protocol.signing import generate

    key = generate()
    for blob in (b"EFP1" + data, data):
        try:
            verify_patch(blob, [key.public_key()], None)
        except PatchError:
            pass


@FUZZ
@given(st.binary(max_size=300), st.integers(0, 2000), st.integers(0, 255))
def test_update_decoder(data, pos, val):
    import numpy as np

    from protocol.compression import CompressionError, Compressor, decode_update

    shapes = {"dense0.weight": (16, 4), "dense0.bias": (4,)}
    good = bytearray(Compressor(topk=0.3, int8=True, zstd=False).encode(
        {k: np.ones(s, np.float32) for k, s in shapes.items()}))
    good[pos % len(good)] = val
    for blob in (bytes(good), data, b"EFU2" + data):
        try:
            decode_update(blob, shapes)
        except CompressionError:
            pass
