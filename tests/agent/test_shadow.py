"""Live shadow collection (pure): bounded, thread-safe, and the agreement it computes."""
import threading

import numpy as np

from agent.serving.shadow import LiveSample, live_agreement


def test_collects_at_most_n_and_wakes_the_waiter():
    s = LiveSample(3)
    got = []
    t = threading.Thread(target=lambda: got.append(s.wait(5)))
    t.start()
    for i in range(10):
        s.tap([float(i)] * 4, i % 2)
    t.join(5)
    assert len(got[0]) == 3 and [lab for _, lab in got[0]] == [0, 1, 0]
    assert got[0][2][0].dtype == np.float32 and got[0][2][0][0] == 2.0


def test_wait_returns_what_came_within_the_window():
    s = LiveSample(100)
    s.tap([1.0], 4)
    assert len(s.wait(0.05)) == 1


def test_agreement():
    items = [(np.array([i], np.float32), i % 3) for i in range(10)]
    assert live_agreement(lambda x: int(x[0]) % 3, items) == 1.0
    assert live_agreement(lambda x: 0, items) == 0.4
    assert live_agreement(lambda x: 0, []) is None


def test_inputs_are_copied_not_aliased():
    s = LiveSample(1)
    x = np.zeros(4, np.float32)
    s.tap(x, 0)
    x[:] = 9
    assert s.wait(0)[0][0].sum() == 0
