"""The registry's site column (both backends) and which site relay may pull which artifact."""
from __future__ import annotations

from collections import Counter

from controller.registry import Registry
from controller.rollouts.runner import RolloutRunner
from controller.rollouts.store import RolloutStore
from protocol.envelope import Envelope


def state(dev: str, status: str = "online", **body) -> Envelope:
    return Envelope(kind="state", sender=dev, body={"status": status, **body})


def test_site_follows_the_board(tmp_path, registry_url):
    reg = Registry(registry_url)
    reg.record_state(state("b1", site="farm-1"))
    assert reg.device("b1").site == "farm-1" and reg.summaries()[0].site == "farm-1"
    reg.record_state(state("b1", site="farm-2"))                    # moved (new config, another broker)
    assert reg.device("b1").site == "farm-2"
    reg.record_state(state("b1", "offline", last_will=True))         # a will without the site keeps it
    assert reg.device("b1").site == "farm-2" and not reg.device("b1").online
    reg.record_state(state("b1"))                                    # online, no site: behind no site now
    assert reg.device("b1").site is None
    assert reg.device("b1").to_json()["site"] is None


def test_a_relay_pulls_only_what_a_board_of_its_site_is_to_get(tmp_path, registry_url):
    reg = Registry(registry_url)
    store = RolloutStore(reg.db, tmp_path / "artifacts")
    for dev, site in (("a1", "farm-1"), ("c1", "farm-2")):
        reg.record_state(state(dev, site=site))
    reg.record_state(state("relay-farm-1", site="farm-1", role="relay"))
    reg.record_state(state("relay-farm-2", site="farm-2", role="relay"))
    reg.record_state(state("fake-relay", site="farm-1"))             # says a site, not the relay role
    store.set_desired("a1", "b" * 64, "2.0", "ro-1")

    class Art:
        bundle_sha256 = "b" * 64

    runner = object.__new__(RolloutRunner)   # the decision alone: no channel, no loop
    runner.registry, runner.store, runner._relay_ok, runner.counts = reg, store, {}, Counter()
    assert runner._relay_may_fetch("relay-farm-1", Art()) is True
    assert runner._relay_may_fetch("relay-farm-2", Art()) is False   # nobody of farm-2 is to get it
    assert runner._relay_may_fetch("fake-relay", Art()) is False
    assert runner._relay_may_fetch("a1", Art()) is False             # boards are served by their own desired
