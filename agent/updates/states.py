"""The life of one model update on the board, as one table (h11's ``_state.py`` shape).

Rules:

* this is the life of the *active transfer*: it starts ``idle``, an accepted offer makes it
  ``downloading`` (``resume`` does the same for a transfer found on disk at start-up), and every
  ``model.update`` status the board reports about it is a step in ``TRANSITIONS``; the final
  ones (``applied``, ``failed``, ``rolled_back``, ``unchanged``) return it to ``idle``;
* a transfer found on disk at start-up resumes as ``downloading``; when every chunk is
  already there (killed after the last one) the next step is ``received`` at once, as soon as
  the agent runs — the same path as the last chunk arriving;
* offers answered before they become the active transfer (wrong base, too large) do not touch
  it; neither does a switch to a version already kept on the board, whose own short life is
  the gate on the target then ``applied``, or ``failed`` (the downgrade rule) / ``rolled_back``
  (its gate refused it), reported without the table (``KEPT_SWITCH``);
* a download may be re-offered (``downloading → downloading``), and anything not final may
  fail (``failed``) or be rolled back after its gate refused it (``rolled_back``);
* any other step is *our* bug (the daemon reported out of order): ``UpdateStateError``, and the
  machine stays in the sticky ``error`` state until ``reset`` — the peer cannot cause it.

Plain data in, plain data out: no clock, no I/O. ``agent.updates.feature`` drives it.
"""
from __future__ import annotations

from protocol.rollout import FINAL_STATUSES

IDLE = "idle"
ERROR = "error"

_ANY_END = frozenset({"failed", "rolled_back"})

TRANSITIONS: dict[str, frozenset[str]] = {
    IDLE: frozenset({"downloading"}),
    "downloading": frozenset({"downloading", "received"}) | _ANY_END,
    "received": frozenset({"verified", "unchanged"}) | _ANY_END,
    "verified": frozenset({"staged", "unchanged"}) | _ANY_END,
    "staged": frozenset({"healthy"}) | _ANY_END,
    "healthy": frozenset({"applied"}) | _ANY_END,
}


#: the statuses a switch to a kept version may report (outside the active transfer's table)
KEPT_SWITCH = frozenset({"applied", "failed", "rolled_back"})


class UpdateStateError(Exception):
    """An out-of-order status: a bug on our side, never the peer's input."""


class UpdateState:
    def __init__(self) -> None:
        self.state = IDLE
        self.history: list[str] = []

    def advance(self, status: str) -> str:
        """Take one reported status; returns the new state (``idle`` after a final one)."""
        if self.state == ERROR:
            raise UpdateStateError(f"update state is sticky-broken (history {self.history})")
        allowed = TRANSITIONS[self.state]
        if status not in allowed:
            was = self.state
            self.state = ERROR
            raise UpdateStateError(f"status {status!r} after {was!r} (allowed: {sorted(allowed)})")
        self.history.append(status)
        self.state = IDLE if status in FINAL_STATUSES else status
        return self.state

    def resume(self) -> None:
        """A transfer found on disk at start-up: it is downloading again."""
        self.state, self.history = "downloading", ["downloading"]

    def reset(self) -> None:
        self.state, self.history = IDLE, []

    @property
    def busy(self) -> bool:
        return self.state not in (IDLE, ERROR)
