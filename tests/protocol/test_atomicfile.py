"""protocol.atomicfile: whole replacement, final mode from the first byte, no temp left behind."""
from __future__ import annotations

import os
import stat

import pytest

from protocol.atomicfile import write_atomic


def test_replaces_whole_file_with_mode(tmp_path):
    p = tmp_path / "sub" / "key.pem"
    write_atomic(p, b"old", 0o600)
    old_umask = os.umask(0)
    try:
        write_atomic(p, "new ✓", 0o600)
    finally:
        os.umask(old_umask)
    assert p.read_text() == "new ✓"
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert sorted(x.name for x in p.parent.iterdir()) == ["key.pem"]


def test_stale_world_readable_temp_is_not_reused(tmp_path):
    p = tmp_path / "secret"
    stale = tmp_path / f".secret.tmp-{os.getpid()}"
    stale.write_bytes(b"junk")
    stale.chmod(0o666)
    write_atomic(p, b"k" * 100_000, 0o600)
    assert p.read_bytes() == b"k" * 100_000
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert not stale.exists()


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    p = tmp_path / "state.json"
    write_atomic(p, b"{}")
    with pytest.raises(TypeError):
        write_atomic(p, 12345)  # type: ignore[arg-type]
    assert p.read_bytes() == b"{}"
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]


def test_replace_dir_swaps_whole_trees_and_leaves_nothing_aside(tmp_path):
    from protocol.atomicfile import replace_dir

    dest = tmp_path / "bundle"
    a = tmp_path / ".a"
    a.mkdir()
    (a / "manifest.json").write_text("v1")
    replace_dir(a, dest)
    b = tmp_path / ".b"
    b.mkdir()
    (b / "manifest.json").write_text("v2")
    (b / "head.npz").write_bytes(b"h")
    replace_dir(b, dest)
    assert (dest / "manifest.json").read_text() == "v2" and (dest / "head.npz").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
