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
    p = SelectionPolicy(clients=10, min_samples=10, deadline_s=10, deadline_fill=0.5, batch_size=32, local_steps=50)
    s = select(clients, p)
    assert s.selected == ("a", "b")
    assert s.excluded["c"] == "offline"
    assert "labelled samples" in s.excluded["d"]
    assert "busy" in s.excluded["e"]
    assert "silent" in s.excluded["f"]
    # a could do 100 steps in ~5 s: it gets the 50 asked; b can do only 10 in time: lowered, and said why
    assert s.steps == {"a": 50, "b": 10}
    assert set(s.lowered) == {"b"} and "64 samples/s fits 10 steps" in s.lowered["b"]


def test_sizing_only_ever_lowers_the_steps_asked():
    p = SelectionPolicy(local_steps=20, min_steps=5, deadline_s=1000)
    assert size_steps(ClientInfo("x", True, 10), p) == 20          # speed unknown: what was asked
    assert size_steps(ClientInfo("x", True, 10, samples_per_s=1e9), p) == 20   # fast: never more
    assert size_steps(ClientInfo("x", True, 10, samples_per_s=1e-3), p) == 5   # slow: fewer, not below min
    assert size_steps(ClientInfo("x", True, 10, samples_per_s=1e9), SelectionPolicy(local_steps=5000)) == 5000


def test_draw_is_seeded_and_bounded():
    clients = [ClientInfo(f"d{i:02d}", True, 50) for i in range(20)]
    p = SelectionPolicy(clients=5)
    s1 = select(clients, p, random.Random(7))
    s2 = select(clients, p, random.Random(7))
    assert s1 == s2 and len(s1.selected) == 5
    assert sum(1 for r in s1.excluded.values() if r == "not drawn this round") == 15
