"""The agent says in its log why it refuses a bundle, not only in an event (issue 16: a bundle whose
input was [null, 3, null, null] was refused at start with an event only, and the log said nothing)."""
import logging

from agent.serving.feature import Serving
from protocol.bundle import write_manifest
from tests.agent.features.fake_context import FakeContext
from tests.controller.test_model_import import exporter_graph


def test_a_refused_bundle_is_logged_with_its_reason(tmp_path, caplog):
    b = tmp_path / "bad"
    b.mkdir()
    exporter_graph(b / "backbone.onnx")
    write_manifest(b, {"name": "bad", "version": "1.0.0", "labels": ["a", "b", "c"],
                       "input": {"name": "img", "shape": [None, 1, None, None]},
                       "files": {"backbone.onnx": {"role": "backbone"}}})
    ctx = FakeContext(state={"dir": str(tmp_path / "state")}, model={"bundle": str(b)})
    serving = Serving(ctx)
    with caplog.at_level(logging.WARNING, logger="edge_agent.serving"):
        serving.start()
    assert serving.engine is None
    refused = ctx.named("model.refused")
    assert refused and "only the batch" in refused[0]["reason"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and "only the batch" in errors[0].getMessage() and str(b) in errors[0].getMessage()
