import asyncio
import io
import os

import numpy as np
import pytest

from agent.serving.results import ResultsLimiter
from agent.serving.sources import PushSource, ReplaySource, Sample, SourceError, StdinSource, load_replay, parse_json_line


def test_load_replay_npy_and_csv(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.array([0, 1, 2]))
    a, b = load_replay(tmp_path / "x.npy", tmp_path / "y.npy")
    assert a.shape == (3, 4) and list(b) == [0, 1, 2]
    (tmp_path / "d.csv").write_text("a,b,label\n1,2,3\n4,5,6\n")
    a, b = load_replay(tmp_path / "d.csv")
    assert a.tolist() == [[1, 2], [4, 5]] and b.tolist() == [3, 6]
    with pytest.raises(SourceError, match="labels for"):
        np.save(tmp_path / "bad_y.npy", np.array([1]))
        load_replay(tmp_path / "x.npy", tmp_path / "bad_y.npy")
    with pytest.raises(SourceError, match=".npy or .csv"):
        load_replay(tmp_path / "x.txt")
    with pytest.raises(SourceError, match="cannot read"):
        load_replay(tmp_path / "missing.npy")


def test_replay_once_and_loop():
    async def take(src, n):
        out = []
        async for s in src:
            out.append(s)
            if len(out) == n:
                break
        return out

    x = np.zeros((3, 2), np.float32)
    once = asyncio.run(take(ReplaySource(x, np.array([0, 1, 2]), 0, loop=False), 10))
    assert [s.label for s in once] == [0, 1, 2]
    looped = asyncio.run(take(ReplaySource(x, None, 0, loop=True), 7))
    assert len(looped) == 7 and looped[-1].id == "replay-7"


@pytest.mark.parametrize("line,msg", [
    ("nope", "not JSON"), ("[1]", "expected an object"), ('{"x": "a"}', "not numeric"),
    ('{"x": [1], "label": 1.5}', "label"), ('{"x": [1], "id": ""}', "'id'"),
])
def test_bad_stdin_lines(line, msg):
    with pytest.raises(SourceError, match=msg):
        parse_json_line(line, 1)


def test_stdin_source_skips_bad_lines():
    r, w = os.pipe()
    os.write(w, b'{"x": [1, 2], "label": 3}\ngarbage\n\n{"id": "k", "x": [0]}\n')
    os.close(w)

    async def run():
        src = StdinSource(os.fdopen(r, "rb"))
        return [s async for s in src], src.bad

    samples, bad = asyncio.run(run())
    assert [(s.id, s.label) for s in samples] == [("stdin-1", 3), ("k", None)]
    assert bad["bad_line"] == 1


def test_push_source_drops_oldest_when_full():
    async def run():
        src = PushSource(maxsize=2)
        for i in range(5):
            src.push(Sample(str(i), np.zeros(1)))
        it = src.__aiter__()
        return [(await it.__anext__()).id for _ in range(2)], src.dropped

    ids, dropped = asyncio.run(run())
    assert ids == ["3", "4"] and dropped == 3


def test_results_summary_every_and_off():
    s = ResultsLimiter("summary", interval_s=10)
    out = []
    for t in range(12):
        out += s.add(float(t), {"label": t % 2, "label_name": str(t % 2), "confidence": 0.5}, label=0)
    assert len(out) == 1 and out[0]["type"] == "summary" and out[0]["count"] == 11
    assert out[0]["class_counts"] == {"0": 6, "1": 5} and out[0]["accuracy"] == pytest.approx(6 / 11, abs=1e-4)
    e = ResultsLimiter("every", interval_s=1, max_per_s=2)
    burst = [m for i in range(10) for m in e.add(0.0, {"label": 1, "confidence": 0.9})]
    assert sum(1 for m in burst if m["type"] == "result") == 2
    later = e.add(1.5, {"label": 1, "confidence": 0.9})
    assert any(m["type"] == "summary" and m["suppressed"] == 8 for m in later)
    assert ResultsLimiter("off").add(0.0, {"label": 1}) == []
    with pytest.raises(ValueError):
        ResultsLimiter("loud")
