"""One process per registry / state dir (protocol/instancelock.py). flock locks belong to an open file,
so a second acquire in this process stands in for a second process."""
from __future__ import annotations

import os

import pytest

from protocol.instancelock import InstanceLock, LockHeld


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    first = InstanceLock(tmp_path / "x.lock", "registry r.db").acquire()
    with pytest.raises(LockHeld, match=rf"registry r.db is already in use by pid {os.getpid()}"):
        InstanceLock(tmp_path / "x.lock", "registry r.db").acquire()
    first.release()
    with InstanceLock(tmp_path / "x.lock", "registry r.db"):   # released: free again
        pass


def test_a_stale_file_does_not_block(tmp_path):
    (tmp_path / "x.lock").write_text("pid 999999 (dead)\n")
    with InstanceLock(tmp_path / "x.lock", "state dir"):
        assert f"pid {os.getpid()}" in (tmp_path / "x.lock").read_text()
