"""Shared fixtures (the helpers they use are plain modules in tests/helpers/) and the markers.

Every test is marked ``unit`` or ``integration`` here: ``integration`` when it lives in
tests/integration/ or uses a fixture that starts a broker, processes or a pty; ``unit`` otherwise
(``pytest -m unit`` runs those alone, in seconds).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.broker import Mosquitto
from tests.helpers.bundles import example_into
from tests.helpers.postgres import pg_url, postgres_server, registry_url  # noqa: F401 - fixtures for every test module

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"
# fixtures that bring up real brokers, agents, controllers or ptys
INTEGRATION_FIXTURES = {"mosquitto", "fleet", "any_fleet", "pty", "postgres_server", "pg_url", "registry_url"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("integration") or item.get_closest_marker("unit"):
            continue
        path = Path(str(item.path)).resolve()
        if INTEGRATION_DIR in path.parents or INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def example_bundle(tmp_path_factory):
    """The real example bundle (digits, int8 ONNX backbone + float head): a copy from the build cache."""
    return example_into(tmp_path_factory.mktemp("bundles") / "digits-1.0.0", size="small", seed=0, epochs=30)


@pytest.fixture(scope="session")
def digits_test():
    from controller.modeltools.example import digits_split

    _, _, x, y = digits_split(0)
    return x, y


@pytest.fixture(scope="session")
def large_bundle(tmp_path_factory):
    """The offload worker's model: the same backbone as example_bundle, a bigger head."""
    out, _ = example_into(tmp_path_factory.mktemp("bundles") / "digits-large", size="large", seed=0, epochs=30)
    return out
