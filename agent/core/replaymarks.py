"""The command verifier's high-water marks on disk, so a restart does not reopen the replay window.

One small JSON file in the state dir (``command-marks.json``), replaced atomically (write a
temporary file, fsync, rename, fsync the directory) each time a mark advances: after a power
cut it holds the old mark or the new one, never half of either. ``protocol.cmdauth`` decides;
this module only reads and writes.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from protocol.atomicfile import write_atomic


class MarksFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self) -> tuple[dict[str, dict[str, Any]], str | None]:
        """(marks, None); ({}, None) when there is no file yet; ({}, why) when it is unreadable."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}, None
        except (OSError, ValueError) as exc:
            return {}, f"{self.path} unreadable: {exc}"
        try:
            marks = {str(k): {"ts": float(v["ts"]), "ids": [str(i) for i in v.get("ids") or []]}
                     for k, v in raw.items()}
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            return {}, f"{self.path} unreadable: {exc!r}"
        return marks, None

    def save(self, marks: dict[str, dict[str, Any]]) -> None:
        write_atomic(self.path, json.dumps(marks, sort_keys=True))
