"""The worker's EDF scheduler, pure: admission, hopeless-task drops, steal selection, estimates."""
import pytest

from controller.offload.scheduler import BUSY, DEADLINE, EdfScheduler, ServiceEstimate


def sched(service_ms=10.0, capacity=64, reply_ms=0.0):
    s = EdfScheduler(capacity, ServiceEstimate(service_ms), reply_ms)
    s.service.observe(service_ms)
    return s


def test_queue_is_served_earliest_deadline_first():
    s = sched()
    for key, dl in (("c", 0.9), ("a", 0.3), ("b", 0.6)):
        assert s.offer(key, dl, 0.0) == []
    order = []
    now = 0.0
    while True:
        t, drops = s.next(now)
        assert drops == []
        if t is None:
            break
        order.append(t.key)
        now += 0.01
        s.done(10.0)
    assert order == ["a", "b", "c"]


def test_a_request_that_cannot_finish_is_dropped_at_once_with_the_reason():
    s = sched(service_ms=10.0)
    (d,) = s.offer("x", 0.005, 0.0)                       # 5 ms left, service takes 10
    assert d.code == DEADLINE and d.task.key == "x" and len(s) == 0
    for i in range(5):
        assert s.offer(f"q{i}", 0.051, 0.0) == []         # finish at 10 … 50 ms
    (d,) = s.offer("late", 0.0555, 0.0)                   # 5 ahead of it (deadline order): would finish at 60 ms
    assert d.code == DEADLINE and "late" in d.reason and len(s) == 5


def test_an_urgent_request_pushes_out_the_queued_one_it_makes_hopeless():
    s = sched(service_ms=10.0)
    assert s.offer("slack", 0.021, 0.0) == []             # alone: finishes at 10 ms
    assert s.offer("a", 0.011, 0.0) == []                 # goes first; slack now finishes at 20 ms: still fits
    drops = s.offer("b", 0.0205, 0.0)                     # b before slack: slack would finish at 30 ms
    assert [(d.task.key, d.code) for d in drops] == [("slack", DEADLINE)]
    assert [t.key for t in s.queue] == ["a", "b"]


def test_the_bound_refuses_with_busy():
    s = sched(service_ms=1.0, capacity=2)
    assert s.offer("a", 10.0, 0.0) == [] and s.offer("b", 10.0, 0.0) == []
    (d,) = s.offer("c", 10.0, 0.0)
    assert d.code == BUSY and len(s) == 2


def test_waiting_tasks_that_can_no_longer_finish_are_dropped_not_served():
    s = sched(service_ms=10.0)
    s.offer("a", 0.05, 0.0)
    s.offer("b", 0.5, 0.0)
    t, drops = s.next(0.045)                              # a can't finish by 50 ms any more
    assert t.key == "b" and [d.task.key for d in drops] == ["a"]
    s.done(10.0)
    s.offer("c", 0.15, 0.1)
    s.service.observe(200.0)                              # the worker slowed down
    assert [d.task.key for d in s.sweep(0.1)] == ["c"]


def test_steal_takes_from_the_back_only_what_the_thief_can_finish():
    s = sched(service_ms=10.0)
    for i, dl in enumerate((0.1, 0.2, 0.3, 0.015 + 0.3)):
        s.offer(f"t{i}", dl, 0.0)
    got = s.steal(2, thief_service_ms=10.0, transfer_ms=5.0, now=0.0)
    assert [t.key for t in got] == ["t3", "t2"]
    assert [t.key for t in s.queue] == ["t0", "t1"]
    s2 = sched(service_ms=10.0)
    s2.offer("only", 1.0, 0.0)
    assert s2.steal(3, 1.0, 1.0, 0.0) == []              # never the head: this worker serves it next
    s3 = sched(service_ms=10.0)
    s3.offer("h", 0.4, 0.0)
    s3.offer("tight", 0.02, 0.0)                          # goes first; "h" is at the back
    assert [t.key for t in s3.steal(3, thief_service_ms=500.0, transfer_ms=5.0, now=0.0)] == []


def test_queue_estimate_counts_the_running_task_and_the_queue():
    s = sched(service_ms=10.0)
    assert s.queue_ms(0.0) == 0.0
    s.offer("a", 1.0, 0.0)
    s.offer("b", 1.0, 0.0)
    assert s.queue_ms(0.0) == pytest.approx(20.0)
    s.next(0.0)
    assert s.queue_ms(0.004) == pytest.approx(6.0 + 10.0)


def test_service_estimate_tracks_mean_and_tail():
    e = ServiceEstimate(5.0)
    e.observe(10.0)
    assert (e.mean, e.dev) == (10.0, 2.5)
    for _ in range(30):
        e.observe(50.0)
    assert e.mean == pytest.approx(50.0, rel=0.01) and e.tail >= e.mean
    with pytest.raises(ValueError):
        EdfScheduler(0)


def test_a_busy_worker_may_give_away_its_whole_queue():
    s = sched(service_ms=10.0)
    s.offer("run", 1.0, 0.0)
    s.offer("q", 1.0, 0.0)
    t, _ = s.next(0.0)                                    # serving "run": "q" waits behind it
    assert t.key == "run" and [x.key for x in s.steal(4, 10.0, 5.0, 0.0)] == ["q"]
