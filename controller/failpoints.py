"""Kill points for crash-safety tests: ``failpoint(name)`` SIGKILLs this process when
``EDGEFLEET_FAILPOINT`` names it. The rounds (controller/fl/runner.py ``FAILPOINTS``) and the
rollouts (controller/rollouts/runner.py ``FAILPOINTS``) call it at every step boundary, so a test
can loop over the steps and prove each is idempotent across a restart or a replica's takeover."""
from __future__ import annotations

import os
import signal


def failpoint(name: str) -> None:
    """SIGKILL this process at ``name`` when EDGEFLEET_FAILPOINT says so (tests of crash safety)."""
    if os.environ.get("EDGEFLEET_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
