"""Entry point of the short-lived training child: ``python -m agent.learning.child``.

Reads one pickled job from stdin, trains, writes the pickled result to stdout. Only numpy
and the trainer are imported, so the child stays small; pickle is used solely on this
private pipe between the agent and the child it started (never on anything from outside).
"""
from __future__ import annotations

import pickle
import sys


def peak_rss_mb() -> float | None:
    """This process's own peak RSS (VmHWM belongs to the address space, so it starts fresh at exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def main() -> None:
    from agent.learning.learner import _train_candidate

    args = pickle.load(sys.stdin.buffer)
    head, rep = _train_candidate(*args)
    pickle.dump((head, rep, peak_rss_mb()), sys.stdout.buffer, protocol=pickle.HIGHEST_PROTOCOL)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
