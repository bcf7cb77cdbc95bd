"""Where inference inputs come from: replay files, JSON lines on stdin, or a queue others feed.

Each source is an async iterator of ``Sample``; a bad record is counted with its reason
and skipped, never fatal. The push source (a bounded asyncio queue) is how the firmware
bridge and other in-process producers hand samples to the agent.
"""
from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
import json
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import numpy as np


@dataclass(frozen=True)
class Sample:
    id: str
    x: np.ndarray
    label: int | None = None
    source: str = ""


class SourceError(ValueError):
    pass


def load_replay(x_path: str | Path, y_path: str | Path | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples from .npy ([n, ...]) or .csv (one sample per row; with ``label`` as the last column
    when the header's last field is named label)."""
    xp = Path(x_path)
    try:
        if xp.suffix == ".npy":
            x = np.load(xp, allow_pickle=False).astype(np.float32)
            y = None
        elif xp.suffix == ".csv":
            with open(xp, encoding="utf-8") as fh:
                header = fh.readline().strip().split(",")
            has_label = header[-1].strip().lower() == "label"
            data = np.loadtxt(xp, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
            x = data[:, :-1].astype(np.float32) if has_label else data.astype(np.float32)
            y = data[:, -1].astype(np.int64) if has_label else None
        else:
            raise SourceError(f"{xp.name}: replay files must be .npy or .csv")
    except (OSError, ValueError) as exc:
        raise SourceError(f"cannot read replay file {xp}: {exc}") from None
    if x.ndim < 2 or len(x) == 0:
        raise SourceError(f"{xp.name}: need an array of samples [n, ...], got shape {list(x.shape)}")
    if y_path:
        try:
            y = np.load(y_path, allow_pickle=False).astype(np.int64).reshape(-1)
        except (OSError, ValueError) as exc:
            raise SourceError(f"cannot read labels {y_path}: {exc}") from None
        if len(y) != len(x):
            raise SourceError(f"{len(y)} labels for {len(x)} samples")
    return x, y


class ReplaySource:
    def __init__(self, x: np.ndarray, y: np.ndarray | None, rate_hz: float, loop: bool, name: str = "replay") -> None:
        self.x, self.y, self.rate_hz, self.loop, self.name = x, y, rate_hz, loop, name
        self.produced = 0

    async def __aiter__(self) -> AsyncIterator[Sample]:
        period = 1.0 / self.rate_hz if self.rate_hz > 0 else 0.0
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        while True:
            for i in range(len(self.x)):
                label = int(self.y[i]) if self.y is not None else None
                self.produced += 1
                yield Sample(f"{self.name}-{self.produced}", self.x[i], label, self.name)
                if period:
                    nxt += period
                    await asyncio.sleep(max(0.0, nxt - loop.time()))
                else:
                    await asyncio.sleep(0)
            if not self.loop:
                return


def parse_json_line(line: str, n: int) -> Sample:
    """One stdin record: {"id": optional, "x": [...], "label": optional int}."""
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise SourceError(f"line {n}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict) or "x" not in obj:
        raise SourceError(f"line {n}: expected an object with 'x'")
    try:
        x = np.asarray(obj["x"], dtype=np.float32)
    except (ValueError, TypeError):
        raise SourceError(f"line {n}: 'x' is not numeric") from None
    label = obj.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int)):
        raise SourceError(f"line {n}: 'label' must be an integer")
    sid = obj.get("id", f"stdin-{n}")
    if not isinstance(sid, str) or not (0 < len(sid) <= 64):
        raise SourceError(f"line {n}: 'id' must be a string of 1-64 chars")
    return Sample(sid, x, label, "stdin")


class StdinSource:
    def __init__(self, stream: Any = None, max_line: int = 1 << 20) -> None:
        self.stream = stream or sys.stdin
        self.max_line = max_line
        self.bad: Counter[str] = Counter()

    async def __aiter__(self) -> AsyncIterator[Sample]:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.max_line)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), self.stream)
        n = 0
        while True:
            try:
                raw = await reader.readline()
            except ValueError:  # line longer than the limit
                self.bad["too_long"] += 1
                continue
            if not raw:
                return
            n += 1
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            try:
                yield parse_json_line(line, n)
            except SourceError:
                self.bad["bad_line"] += 1


class PushSource:
    """A bounded queue fed by in-process producers; drops the oldest when full (counted)."""

    def __init__(self, maxsize: int = 256, name: str = "push") -> None:
        self.q: asyncio.Queue[Sample] = asyncio.Queue(maxsize)
        self.name = name
        self.dropped = 0

    def push(self, sample: Sample) -> None:
        if self.q.full():
            self.q.get_nowait()
            self.dropped += 1
        self.q.put_nowait(sample)

    async def __aiter__(self) -> AsyncIterator[Sample]:
        while True:
            yield await self.q.get()
