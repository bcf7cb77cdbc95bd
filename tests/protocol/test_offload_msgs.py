"""Offload message bodies (pure): the deadline budget, refusal codes, worker status, steal requests."""
import pytest

import protocol.offload  # noqa: F401 - registers the kinds
from protocol.envelope import KINDS, DecodeError

REQ = {"mode": "raw", "deadline_ts": 1.0, "model": "digits"}


def check(kind, body):
    KINDS[kind](body)


@pytest.mark.parametrize("body", [REQ, {**REQ, "budget_ms": 150.5}, {**REQ, "budget_ms": 3}])
def test_requests_with_or_without_a_budget_are_valid(body):
    check("offload.request", body)


@pytest.mark.parametrize("budget", [0, -5, "100", True, float("nan")])
def test_a_bad_budget_is_refused_naming_the_field(budget):
    with pytest.raises(DecodeError, match="budget_ms"):
        check("offload.request", {**REQ, "budget_ms": budget})


def test_refusals_carry_a_known_reason_code():
    check("offload.reply", {"ok": False, "error": "too late", "code": "deadline", "worker": "w"})
    check("offload.reply", {"ok": False, "error": "old worker, no code"})
    with pytest.raises(DecodeError, match="code"):
        check("offload.reply", {"ok": False, "error": "x", "code": "teleport"})


def test_worker_status_says_what_it_accepts_and_its_queue():
    good = {"worker": "w", "served": 1, "queue_ms": 3.5, "queue_len": 2, "service_ms": 1.0,
            "accepts": {"raw": True, "splits": ["ab"], "input_shape": [None, 64]}}
    check("offload.status", good)
    check("offload.status", {"worker": "w", "served": 0})                  # an old worker
    for bad, where in (({"queue_len": -1}, "queue_len"), ({"queue_ms": "soon"}, "queue_ms"),
                       ({"accepts": {"raw": "yes"}}, "accepts"), ({"accepts": {"splits": [1]}}, "accepts")):
        with pytest.raises(DecodeError, match=where):
            check("offload.status", {**good, **bad})


def test_steal_requests_are_bounded():
    check("offload.steal", {"thief": "w2", "n": 4, "service_ms": 9.5})
    for n in (0, 65, "4"):
        with pytest.raises(DecodeError):
            check("offload.steal", {"thief": "w2", "n": n})
