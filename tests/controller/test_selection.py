import random

from controller.fl.selection import ClientInfo, SelectionPolicy, select, size_steps


def test_eligibility_reasons_and_sizing():
    clients = [
        ClientInfo("a", True, 100, 10.0, 640.0),
        ClientInfo("b", True, 100, 10.0, 64.0),
        ClientInfo("c", False, 100),
        ClientInfo("d", True, 0),
        ClientInfo("e", True, 100, 99.0),
        ClientInfo("f", True, 100, None, None, last_seen_age_s=500),
    ]
    p = SelectionPolicy(clients=10, min_samples=10, deadline_s=10, deadline_fill=0.5, batch_size=32, max_steps=1000)
    s = select(clients, p)
    assert s.selected == ("a", "b")
    assert s.excluded["c"] == "offline"
    assert "labelled samples" in s.excluded["d"]
    assert "busy" in s.excluded["e"]
    assert "silent" in s.excluded["f"]
    # a is 10x faster than b: 10x the steps, both finish in ~5 s
    assert s.steps == {"a": 100, "b": 10}


def test_unknown_speed_gets_default_and_caps_apply():
    p = SelectionPolicy(local_steps=20, min_steps=5, max_steps=50, deadline_s=1000)
    assert size_steps(ClientInfo("x", True, 10), p) == 20
    assert size_steps(ClientInfo("x", True, 10, samples_per_s=1e9), p) == 50
    assert size_steps(ClientInfo("x", True, 10, samples_per_s=1e-3), p) == 5


def test_draw_is_seeded_and_bounded():
    clients = [ClientInfo(f"d{i:02d}", True, 50) for i in range(20)]
    p = SelectionPolicy(clients=5)
    s1 = select(clients, p, random.Random(7))
    s2 = select(clients, p, random.Random(7))
    assert s1 == s2 and len(s1.selected) == 5
    assert sum(1 for r in s1.excluded.values() if r == "not drawn this round") == 15
