"""Data and waits for the learning tests: synthetic blobs and heads, digits shards per device,
agents with a replay stream, and a federated run's store."""
from __future__ import annotations

import sqlite3

import numpy as np

from .fleet import device
from .waiting import wait_for


def blobs(n, dim=8, k=3, seed=0, shift=0.0):
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(42).normal(0, 3, (k, dim))
    y = rng.integers(0, k, n)
    x = centers[y] + rng.normal(0, 1, (n, dim)) + shift
    return x.astype(np.float32), y


def head(dims, seed=0):
    rng = np.random.default_rng(seed)
    h = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        h[f"dense{i}.weight"] = rng.normal(0, 0.3, (a, b)).astype(np.float32)
        h[f"dense{i}.bias"] = rng.normal(0, 0.1, b).astype(np.float32)
    return h


def shards(tmp_path, n: int, per: int = 160):
    """Non-IID shards of the digits training split: each device sees mostly a few classes."""
    from controller.modeltools.example import digits_split

    xtr, ytr, _, _ = digits_split(0)
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        pref = np.isin(ytr, [(2 * i + c) % 10 for c in range(4)])
        idx = np.concatenate([rng.choice(np.flatnonzero(pref), per * 3 // 4, replace=False),
                              rng.choice(len(ytr), per // 4, replace=False)])
        np.save(tmp_path / f"x{i}.npy", xtr[idx])
        np.save(tmp_path / f"y{i}.npy", ytr[idx])
        out.append((tmp_path / f"x{i}.npy", tmp_path / f"y{i}.npy"))
    return out


def agent_extra(bundle, x, y, cpu: float = 0.5) -> str:
    return (f'[model]\nbundle = "{bundle}"\n[inference]\nsource = "replay"\nreplay_x = "{x}"\nreplay_y = "{y}"\n'
            f'rate_hz = 400\nloop = false\nresults = "off"\n[learning]\nenabled = false\ncpu_fraction = {cpu}\n')


def ready(db, dev, n=20):
    return wait_for(lambda: (d := device(db, dev)) and d.online and
                    ((d.telemetry or {}).get("learning") or {}).get("labelled_samples", 0) >= n, timeout=30,
                    what=f"{dev} with labelled samples")


def store(db):
    from controller.fl.store import RoundStore

    return RoundStore(sqlite3.connect(db, timeout=10))


def wait_run(db, run_id, timeout=60):
    return wait_for(lambda: (r := store(db).run(run_id)) and r.status in ("done", "partial", "failed", "cancelled") and r,
                    timeout=timeout,
                    what=f"run {run_id} to end")
