"""The relay's chunk cache (files in a temporary directory, no broker)."""
from __future__ import annotations

import hashlib
import os

from agent.relay.cache import ChunkCache


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_put_get_refuses_wrong_bytes_and_survives_restart(tmp_path):
    c = ChunkCache(tmp_path, 1 << 20)
    a = os.urandom(1000)
    assert not c.put(sha(b"other"), a) and len(c) == 0          # content-addressed: the hash must match
    assert c.put(sha(a), a) and c.get(sha(a)) == a
    assert not list(tmp_path.rglob(".*.tmp"))                    # written by rename, no temporary left
    (tmp_path / "ab").mkdir(exist_ok=True)
    (tmp_path / "ab" / ".half.tmp").write_bytes(b"half")         # killed mid-write
    c2 = ChunkCache(tmp_path, 1 << 20)
    assert c2.get(sha(a)) == a and c2.bytes == 1000
    assert not (tmp_path / "ab" / ".half.tmp").exists()


def test_corrupt_file_is_evicted_not_served(tmp_path):
    c = ChunkCache(tmp_path, 1 << 20)
    a = os.urandom(500)
    c.put(sha(a), a)
    p = tmp_path / sha(a)[:2] / sha(a)
    p.write_bytes(b"\0" + a[1:])
    assert c.get(sha(a)) is None and sha(a) not in c and not p.exists()
    assert c.stats()["corrupt"] == 1


def test_lru_eviction_by_bytes_keeps_recent_ones(tmp_path):
    c = ChunkCache(tmp_path, 2500)
    blobs = [os.urandom(1000) for _ in range(3)]
    c.put(sha(blobs[0]), blobs[0])
    c.put(sha(blobs[1]), blobs[1])
    assert c.get(sha(blobs[0])) == blobs[0]          # 0 is now the most recent
    c.put(sha(blobs[2]), blobs[2])                   # over the bound: 1, the least recent, goes
    assert sha(blobs[1]) not in c and sha(blobs[0]) in c and sha(blobs[2]) in c
    assert c.bytes == 2000 <= c.max_bytes
    assert ChunkCache(tmp_path, 1500).bytes <= 1500  # a smaller bound at restart evicts down to it
