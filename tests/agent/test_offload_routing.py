"""The board's per-worker router, pure: compatibility, expected completion, slowdowns, failures."""
from agent.offload.policy import LOCAL_LOW, OFFLOAD, OffloadPolicy, RttEstimator, decide
from agent.offload.routing import WorkerRouter

SPLIT = "a" * 64


def status(wid, queue_ms=0.0, service_ms=5.0, raw=True, splits=(SPLIT,), shape=(None, 64)):
    return {"worker": wid, "served": 0, "topic": f"edgefleet/v1/offload/req/{wid}", "queue_ms": queue_ms,
            "service_ms": service_ms, "accepts": {"raw": raw, "splits": list(splits), "input_shape": list(shape)}}


def router(*statuses, now=0.0):
    r = WorkerRouter()
    for st in statuses:
        r.on_status(st["worker"], st, now)
    return r


def test_features_go_only_to_workers_of_the_same_split_and_raw_only_to_raw_workers():
    r = router(status("cascade", splits=()), status("head", raw=False))
    route, _ = r.choose("features", SPLIT, None, 100.0, 0.0)
    assert route.worker == "head" and route.topic.endswith("/head")
    assert r.choose("features", "b" * 64, None, 100.0, 0.0) == (None, "no worker accepts features input of this split")
    assert r.choose("raw", None, 64, 100.0, 0.0)[0].worker == "cascade"
    assert r.choose("raw", None, 65, 100.0, 0.0)[0] is None          # its input has another size


def test_the_earliest_expected_completion_wins_and_a_hopeless_one_is_refused_with_why():
    r = router(status("busy", queue_ms=60.0), status("idle"))
    assert r.choose("raw", None, 64, 100.0, 0.0)[0].worker == "idle"
    route, why = r.choose("raw", None, 64, 5.0, 0.0)
    assert route is None and "would miss the deadline" in why


def test_a_worker_slowed_5x_is_avoided_after_a_few_replies():
    r = router(status("w1"), status("w2"))
    for _ in range(5):
        for w in ("w1", "w2"):
            r.on_sent(w)
            r.on_reply(w, 7.0, {"ok": True, "service_ms": 5.0, "wait_ms": 0.0, "queue_ms": 0.0}, 0.0)
    picks = []
    for i in range(4):
        r.on_sent("w1")
        r.on_reply("w1", 27.0, {"ok": True, "service_ms": 25.0, "wait_ms": 0.0, "queue_ms": 0.0}, 0.0)
        picks.append(r.choose("raw", None, 64, 100.0, 0.0)[0].worker)
    assert picks[-1] == "w2" and r.expected_ms("w1", 0.0) > 3 * r.expected_ms("w2", 0.0)


def test_in_flight_requests_count_until_the_status_catches_up():
    r = router(status("w1"), status("w2"))
    r.on_sent("w1")
    r.on_sent("w1")
    assert r.choose("raw", None, 64, 100.0, 0.0)[0].worker == "w2"


def test_a_timeout_benches_the_worker_and_a_cleared_status_removes_it():
    r = router(status("w1"), status("w2"))
    for _ in range(2):                                    # one timeout is a sample; two in a row bench it
        r.on_sent("w1")
        r.on_timeout("w1", 1.0)
    assert r.choose("raw", None, 64, 100.0, 1.5)[0].worker == "w2"
    r.on_status("w2", None, 1.6)
    assert r.choose("raw", None, 64, 100.0, 1.7) == (None, "every compatible worker timed out recently")
    assert r.choose("raw", None, 64, 100.0, 1.0 + r.fail_s + 0.1)[0].worker == "w1"
    assert not router().known(0.0) and not router(status("w1"), now=0.0).known(100.0)


def test_an_old_worker_status_is_not_routable_and_late_replies_still_teach():
    r = router({"worker": "old", "served": 3})
    assert not r.known(0.0)
    r = router(status("w1"))
    r.on_sent("w1")
    r.on_timeout("w1", 0.0)
    r.on_reply("w1", 400.0, {"ok": True, "service_ms": 390.0, "wait_ms": 0.0}, 0.5, late=True)
    assert r.workers["w1"].late == 1 and r.workers["w1"].inflight == 0 and r.expected_ms("w1", 0.5) > 300


def test_a_bad_moment_ages_out_without_new_samples():
    r = router(status("w1"))
    r.on_sent("w1")
    r.on_reply("w1", 6.0, {"ok": True, "service_ms": 5.0}, 0.0)
    r.on_sent("w1")
    r.on_reply("w1", 300.0, {"ok": True, "service_ms": 5.0}, 0.0)   # the network stalled once
    assert r.expected_ms("w1", 0.0) > 100 and r.expected_ms("w1", 10.0) < 20


def test_decide_uses_the_route_or_the_reason_there_is_none():
    p = OffloadPolicy(enabled=True, threshold=0.8, deadline_ms=100)
    assert decide(0.5, 2.0, p, RttEstimator(), True, routed_ms=20.0).path == OFFLOAD
    d = decide(0.5, 2.0, p, RttEstimator(), True, no_route="no worker accepts raw input")
    assert d.path == LOCAL_LOW and d.reason == "no worker accepts raw input"


def test_a_stolen_request_answered_by_the_thief_teaches_the_thief():
    r = router(status("victim"), status("thief"))
    r.on_sent("victim")
    r.on_reply("victim", 50.0, {"ok": True, "worker": "thief", "service_ms": 30.0, "stolen_from": "victim"}, 0.0)
    assert r.workers["victim"].inflight == 0 and r.workers["victim"].ok == 0
    assert r.workers["thief"].ok == 1 and r.workers["thief"].service.mean > 5.0
