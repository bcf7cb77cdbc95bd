"""Federated learning benchmark: edgefleet's rounds vs centralized training and vs Flower.

On real data (scikit-learn's digits through the example bundle's int8 backbone), split
non-IID over 20 clients (Dirichlet alpha = 0.3). Every client trains the head locally with
the agent's own trainer; aggregation is edgefleet's FedAvg strategy, or Flower's FedAvg
(``flwr.server.strategy.FedAvg.aggregate_fit``, bench extra) fed the very same client
results, or centralized training of the same head on all the data. Also: uplink bytes with
the device-side compression (top-k + error feedback, int8, zstd) vs float32 updates, and
aggregation speed on 1,000 updates x 100k parameters vs Flower's ``aggregate``.
Never fails on a number; last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
logging.disable(logging.WARNING)

from agent.serving.inference import InferenceEngine  # noqa: E402
from agent.learning.trainer import HeadTrainer, TrainConfig, accuracy  # noqa: E402
from controller.fl import aggregate as agg  # noqa: E402
from controller.modeltools.example import build_example, digits_split  # noqa: E402
from controller.fl.strategies import make  # noqa: E402
from protocol.bundle import load_bundle  # noqa: E402
from protocol.compression import Compressor, decode_update  # noqa: E402

NAMES = ("dense0.weight", "dense0.bias")


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, rng) -> list[np.ndarray]:
    idx = [[] for _ in range(clients)]
    for c in np.unique(y):
        ids = rng.permutation(np.flatnonzero(y == c))
        props = rng.dirichlet([alpha] * clients)
        cuts = (np.cumsum(props) * len(ids)).astype(int)[:-1]
        for k, part in enumerate(np.split(ids, cuts)):
            idx[k] += part.tolist()
    return [np.array(sorted(i), dtype=np.int64) for i in idx]


def init_head(dim: int, rng) -> dict:
    return {"dense0.weight": (rng.normal(0, 0.01, (dim, 10))).astype(np.float32), "dense0.bias": np.zeros(10, np.float32)}


def local_train(head, x, y, steps, seed):
    t = HeadTrainer(head, TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=16, seed=seed))
    t.train(x, y, steps, yield_every=0)
    return t.head()


def run_fl(parts, ftr, ytr, fte, yte, rounds, steps, rng_seed, aggregator, compress=None):
    rng = np.random.default_rng(rng_seed)
    head = init_head(ftr.shape[1], np.random.default_rng(0))
    comps = [Compressor(**compress) if compress else None for _ in parts]
    up_bytes = raw_bytes = 0
    shapes = {k: v.shape for k, v in head.items()}
    for r in range(rounds):
        results = []
        for i, p in enumerate(parts):
            if len(p) == 0:
                continue
            local = local_train(head, ftr[p], ytr[p], steps, seed=rng_seed * 1000 + r * 100 + i)
            delta = {k: local[k] - head[k] for k in head}
            raw_bytes += sum(v.nbytes for v in delta.values())
            if comps[i] is not None:
                blob = comps[i].encode(delta)
                up_bytes += len(blob)
                delta = decode_update(blob, shapes)
            else:
                up_bytes += sum(v.nbytes for v in delta.values())
            results.append((delta, len(p), 0))
        head = aggregator(head, results)
        _ = rng
    return accuracy(head, fte, yte), up_bytes, raw_bytes


def edgefleet_fedavg(head, results):
    return make("fedavg").aggregate_deltas(head, results)


def flower_fedavg():
    from flwr.common import FitRes, Status, Code, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    strategy = FedAvg()

    class _Proxy:  # aggregate_fit only reads the results' FitRes
        cid = "x"

    def aggregate(head, results):
        fit = [(_Proxy(), FitRes(Status(Code.OK, ""), ndarrays_to_parameters([head[k] + d[k] for k in NAMES]), n, {}))
               for d, n, _ in results]
        params, _ = strategy.aggregate_fit(1, fit, [])
        arrs = parameters_to_ndarrays(params)
        return {k: a.astype(np.float32) for k, a in zip(NAMES, arrs)}

    return aggregate


def bench_aggregation(n_updates: int, n_params: int, reps: int) -> dict:
    from flwr.server.strategy.aggregate import aggregate as flwr_aggregate

    rng = np.random.default_rng(0)
    ups = [{"w": rng.normal(size=n_params).astype(np.float32)} for _ in range(n_updates)]
    ns = rng.integers(10, 500, n_updates)
    flwr_in = [([u["w"]], int(n)) for u, n in zip(ups, ns)]
    t_ours, t_flwr = [], []
    for _ in range(reps):
        t = time.perf_counter()
        ours = agg.fast_weighted_average(ups, ns)
        t_ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        theirs = flwr_aggregate(flwr_in)
        t_flwr.append(time.perf_counter() - t)
    diff = float(np.abs(ours["w"].astype(np.float64) - np.asarray(theirs[0], np.float64)).max())
    return {"aggregate_ms": round(min(t_ours) * 1000, 2), "flower_aggregate_ms": round(min(t_flwr) * 1000, 2),
            "aggregate_speedup_vs_flower": round(min(t_flwr) / min(t_ours), 3), "aggregate_max_abs_diff": diff,
            "aggregate_shape": [n_updates, n_params]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rounds, steps = (15, 10) if a.quick else (40, 20)
    work = Path(tempfile.mkdtemp(prefix="edgefleet-fl-"))
    build_example(work / "b", "small", epochs=30)
    eng = InferenceEngine(load_bundle(work / "b"))
    xtr, ytr, xte, yte = digits_split()
    feats = lambda x: np.concatenate([eng.runtime.run(x[i:i + 1]) for i in range(len(x))])  # noqa: E731
    ftr, fte = feats(xtr), feats(xte)
    parts = dirichlet_split(ytr, 20, 0.3, np.random.default_rng(0))
    sizes = [len(p) for p in parts]
    fig: dict = {"clients": 20, "alpha": 0.3, "rounds": rounds, "local_steps": steps,
                 "client_sizes_min_max": [min(sizes), max(sizes)]}

    c = HeadTrainer(init_head(ftr.shape[1], np.random.default_rng(0)),
                    TrainConfig(lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=16))
    c.train(ftr, ytr, rounds * steps * 4, yield_every=0)
    central = accuracy(c.params, fte, yte)
    ours, up_raw, _ = run_fl(parts, ftr, ytr, fte, yte, rounds, steps, 1, edgefleet_fedavg)
    fig.update(central_accuracy=round(central, 4), fl_accuracy=round(ours, 4), fl_vs_central=round(ours / central, 4))
    print(f"non-IID digits, 20 clients (sizes {min(sizes)}..{max(sizes)}), {rounds} rounds x {steps} local steps: "
          f"edgefleet FedAvg {ours:.4f} vs centralized {central:.4f} ({ours / central:.2%})")
    try:
        theirs, _, _ = run_fl(parts, ftr, ytr, fte, yte, rounds, steps, 1, flower_fedavg())
        fig.update(flower_accuracy=round(theirs, 4), fl_minus_flower_pts=round(100 * (ours - theirs), 3))
        print(f"Flower FedAvg on the same clients and local training: {theirs:.4f} "
              f"(edgefleet - Flower = {100 * (ours - theirs):+.2f} pts)")
    except ImportError:
        print("flwr not installed (pip install 'edgefleet[bench]'): Flower comparison skipped")
    comp = {"topk": 0.05, "int8": True, "zstd": True}
    cacc, up_c, raw = run_fl(parts, ftr, ytr, fte, yte, rounds, steps, 1, edgefleet_fedavg, comp)
    fig.update(compression=comp, uplink_bytes_per_round=round(up_c / rounds), raw_uplink_bytes_per_round=round(raw / rounds),
               uplink_reduction=round(raw / up_c, 2), compressed_accuracy=round(cacc, 4),
               compressed_acc_drop_pts=round(100 * (ours - cacc), 3))
    print(f"compressed updates (top-5% + error feedback, int8, zstd): {up_c / rounds:.0f} B/round vs "
          f"{raw / rounds:.0f} B/round float32 ({raw / up_c:.1f}x less), accuracy {cacc:.4f} "
          f"({100 * (ours - cacc):+.2f} pts vs uncompressed)")
    try:
        n_up = 300 if a.quick else 1000
        ag = bench_aggregation(n_up, 100_000, 3 if a.quick else 5)
        fig.update(ag)
        print(f"aggregation of {n_up} x 100k float32: edgefleet {ag['aggregate_ms']} ms vs Flower "
              f"{ag['flower_aggregate_ms']} ms ({ag['aggregate_speedup_vs_flower']}x), max |diff| "
              f"{ag['aggregate_max_abs_diff']:.1e}")
    except ImportError:
        pass
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
