"""Auto-accept: which claims the controller accepts without an operator (pure)."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class AutoAccept:
    """Accept a claim whose device id matches one of ``patterns`` (shell globs) or that carries one
    of ``tags``. Empty both: every claim waits for ``fleetctl devices accept``."""
    patterns: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()

    def matches(self, device_id: str, tags: tuple[str, ...] | list[str]) -> str | None:
        """The rule that accepts it (for the audit), or None."""
        for p in self.patterns:
            if fnmatch.fnmatchcase(device_id, p):
                return f"auto-accept pattern {p}"
        for t in tags:
            if t in self.tags:
                return f"auto-accept tag {t}"
        return None
