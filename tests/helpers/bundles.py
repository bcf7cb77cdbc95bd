"""Example bundles built once per build parameters and per version of the code that builds them.

``build_example`` trains an MLP and quantizes it: seconds of CPU per bundle, every test session.
The result is kept under ``$EDGEFLEET_TEST_CACHE`` (default ``~/.cache/edgefleet-tests``) in a
folder named by a hash of the parameters and of the source of the model tools and of
``protocol/bundle.py``, so a change to either builds anew. A build goes to a private folder that is
renamed into place under a lock: parallel pytest processes build each entry once, the others wait.
Tests get a copy (``copy_into``), never the cache itself.
"""
from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import shutil
import uuid
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("EDGEFLEET_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgefleet-tests"


def _code_hash() -> str:
    """The model tools' package (every .py beside build_example) and protocol/bundle.py."""
    import protocol.bundle
    from controller.modeltools import example

    h = hashlib.sha256()
    tools = Path(inspect.getfile(example)).resolve().parent
    for f in sorted(tools.glob("*.py")) + [Path(inspect.getfile(protocol.bundle)).resolve()]:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def build_key(**params) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    h.update(_code_hash().encode())
    # numpy's BLAS rounds differently with another thread count: a bundle built under
    # OPENBLAS_NUM_THREADS=1 and one built without would not share their backbone bit for bit
    # (the offload worker's large bundle must match the example's), so keep them apart
    h.update(json.dumps({k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                        "MKL_NUM_THREADS")}).encode())
    return h.hexdigest()[:20]


def cached_example(size: str = "small", seed: int = 0, epochs: int = 40, version: str = "1.0.0",
                   name: str = "digits") -> tuple[Path, dict]:
    """``build_example(...)`` from the cache (built on a miss): the bundle's folder and its report."""
    from controller.modeltools.example import build_example

    params = dict(size=size, seed=seed, epochs=epochs, version=version, name=name)
    entry = cache_root() / "bundles" / f"{name}-{size}-{build_key(**params)}"
    if not (entry / "report.json").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        # one build per entry at a time (xdist workers, parallel sessions); the others wait for it
        with open(entry.with_name(entry.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (entry / "report.json").exists():
                _build(entry, build_example, params)
    return entry / "bundle", json.loads((entry / "report.json").read_text())


def _build(entry: Path, build_example, params: dict) -> None:
    work = entry.with_name(f".{entry.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        report = build_example(work / "bundle", **params).to_dict()
        (work / "report.json").write_text(json.dumps(report))   # written last: marks the entry whole
        os.rename(work, entry)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def copy_into(src: Path, out: Path) -> Path:
    """A private, writable copy of a cached bundle."""
    shutil.copytree(src, out)
    return out


def example_into(out: Path, **params):
    """A copy of the cached example bundle at ``out`` and its ``BuildReport`` (``path`` = ``out``)."""
    from controller.modeltools.example import BuildReport

    src, report = cached_example(**params)
    copy_into(src, out)
    fields = {k: v for k, v in report.items() if k in BuildReport.__dataclass_fields__}
    return out, BuildReport(**{**fields, "path": str(out)})


def make_plain_bundle(out: Path, model: Path, version: str = "1.0.0", name: str = "plain") -> Path:
    """A backbone-only bundle around a single-graph model (its output is the class scores)."""
    from protocol.bundle import write_manifest

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(model, out / model.name)
    write_manifest(out, {"name": name, "version": version,
                         "input": {"name": "input", "shape": [1, 64], "dtype": "float32", "min": 0.0, "max": 16.0},
                         "labels": [str(i) for i in range(10)],
                         "files": {model.name: {"role": "backbone"}}})
    return out


def cached_cnn(seed: int = 0, epochs: int = 8, n_train: int = 4000) -> tuple[Path, dict]:
    """The shapes CNN bundle (``controller/modeltools/cnn.py``, ~1-2 min of numpy training) from
    the cache; keyed by its parameters and the source of cnn.py and protocol/bundle.py only (the
    exit and bottleneck tools built on top of it are cheap and run in the tests)."""
    import protocol.bundle
    from controller.modeltools import cnn

    params = dict(seed=seed, epochs=epochs, n_train=n_train)
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for mod in (cnn, protocol.bundle):
        h.update(Path(inspect.getfile(mod)).read_bytes())
    h.update(json.dumps({k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}).encode())
    entry = cache_root() / "bundles" / f"shapes-cnn-{h.hexdigest()[:20]}"
    if not (entry / "report.json").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(entry.with_name(entry.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (entry / "report.json").exists():
                _build(entry, cnn.build_cnn, params)
    return entry / "bundle", json.loads((entry / "report.json").read_text())


def cached_exit_bundles(n_data: int = 3000) -> dict[str, Path]:
    """Bundles on top of the shapes CNN, built once per source version (~20 s):

    * ``exits`` — exits at block2 and block3 (distilled heads, thresholds searched; an exit at
      block1 never passes the agreement bound on this model and would only cost its head),
    * ``pair_a`` / ``pair_b`` — ``exits`` plus a bottleneck at block2 (ratio 0.16), two
      trainings (seeds 0 and 1): the same split, two different encoder/decoder pairs,
    * ``other_split`` — exits at block1 and block3 (exit 0 is another tensor: another split),
    * ``data`` — the ``n_data`` images the exit heads and bottlenecks are trained on (the tests
      use 3000; bench/offload.py 8000, for better heads)."""
    import protocol.bundle
    import protocol.exits
    from controller.modeltools import bottleneck, cnn, exits

    src, _ = cached_cnn()
    h = hashlib.sha256(f"{src}\0{n_data}".encode())
    h.update(inspect.getsource(cached_exit_bundles).encode())     # what is built here (tensors, ratios)
    for mod in (cnn, exits, bottleneck, protocol.bundle, protocol.exits):
        h.update(Path(inspect.getfile(mod)).read_bytes())
    entry = cache_root() / "bundles" / f"shapes-exits-{h.hexdigest()[:20]}"
    names = ("exits", "pair_a", "pair_b", "other_split")
    if not (entry / "done").exists():
        entry.parent.mkdir(parents=True, exist_ok=True)
        with open(entry.with_name(entry.name + ".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (entry / "done").exists():
                work = entry.with_name(f".{entry.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
                try:
                    work.mkdir(parents=True)
                    data = cnn.write_data(work / "data.npz", n=n_data)
                    exits.add_exits(src, ["block2", "block3"], work / "exits", data=data)
                    for name, seed in (("pair_a", 0), ("pair_b", 1)):
                        bottleneck.add_bottleneck(work / "exits", work / name, 0.16, data=data, at="block2",
                                                  epochs=10 if n_data > 3000 else 6, seed=seed, max_drop=0.05)
                    exits.add_exits(src, ["block1", "block3"], work / "other_split", data=data, hidden=0,
                                    thresholds=[0.99, 0.9])
                    (work / "done").write_text("ok")
                    os.rename(work, entry)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
    return {**{n: entry / n for n in names}, "data": entry / "data.npz"}
