"""Federated learning benchmark: edgefleet's strategies vs Flower's FedAvg and centralized training.

Two tasks, each split over 50 clients by a proper Dirichlet draw (every client samples its own
class mix q ~ Dir(α), α = 0.1, then its samples), 10 clients sampled per round by the round
engine's own selection, every client training with the agent's numpy trainer:

* ``mnist1d`` — a whole small MLP (40-64-64-10) on MNIST-1D, generated locally by the
  ``mnist1d`` package's generator (``make_dataset``; never downloaded; cached as .npz);
* ``head`` (full run only) — the example bundle's float head over its int8 backbone on
  scikit-learn's digits (the earlier linear-probe task).

Figures: accuracy per strategy (FedAvg, FedAvgM, SCAFFOLD, FedAdam with bias correction) as the
mean of the last 5 rounds, Flower's ``FedAvg.aggregate_fit`` fed the same client results,
centralized training, FedPer personalization (mean per-board test accuracy, gated on each
board's validation slice) vs the global model, whole ``fl.update`` MQTT payloads (envelope +
frame) compressed vs fp32 and the accuracy it costs, and SecAgg with 10 % and 30 % of the
clients dropping (result vs plain aggregation, bytes and seconds). Never fails on a number;
the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()   # the figures' "seconds" include the imports

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matmuls: threads only contend

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
logging.disable(logging.WARNING)

from agent.learning.trainer import accuracy  # noqa: E402
from controller.fl.strategies import make  # noqa: E402
from protocol.compression import RECOMMENDED  # noqa: E402
from fl_sim import (Local, FlowerFedAvg, central, dirichlet_split, init_mlp, make_clients, personalize,  # noqa: E402
                    run_fl, secagg_round, _local_update)

ALPHA, CLIENTS, PER_ROUND = 0.1, 50, 10
#: compressions measured; the first is protocol.compression.RECOMMENDED (the one --quick measures)
COMPRESSIONS = (RECOMMENDED, {"topk": 0.1, "int8": True, "zstd": True},
                {"topk": 0.25, "int8": True, "zstd": True},
                {"int8": True, "zstd": True})


def mnist1d_data(n: int = 5000) -> tuple[np.ndarray, ...]:
    """MNIST-1D from the package's own generator (offline), cached under ~/.cache/edgefleet."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgefleet" / f"mnist1d-{n}.npz"
    if not cache.exists():
        from mnist1d.data import get_dataset_args, make_dataset   # generates; get_dataset would download

        args = get_dataset_args()
        args.num_samples = n
        ds = make_dataset(args)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, x=ds["x"], y=ds["y"], xt=ds["x_test"], yt=ds["y_test"])
        os.replace(tmp, cache)
    with np.load(cache) as z:
        return z["x"].astype(np.float32), z["y"].astype(np.int64), z["xt"].astype(np.float32), z["yt"].astype(np.int64)


def tail(curve, k=5) -> float:
    return float(np.mean(curve[-k:]))


def one_round_diff(clients, head0, local: Local) -> float:
    """edgefleet's FedAvg vs Flower's on one round of the same 10 client updates."""
    from controller.fl.strategies import FitResult

    res = [FitResult(_local_update(c, head0, {"round": 1, "steps": local.steps}, local, 0), len(c.y), 0, c.cid)
           for c in clients[:PER_ROUND]]
    a = make("fedavg").aggregate(head0, res)
    b = FlowerFedAvg().aggregate(head0, res)
    return float(max(np.max(np.abs(a[k].astype(np.float64) - b[k])) for k in a))


def fedadam_flower_diff(clients, head0, local: Local, rounds: int = 3) -> float:
    """edgefleet's ``fedadam flower=true`` vs ``flwr.server.strategy.FedAdam`` over a few rounds of
    the same client results (max |difference| of the heads)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAdam

    from controller.fl.strategies import FitResult

    names = sorted(head0)
    ours = make("fedadam", eta=0.01, beta1=0.9, beta2=0.99, tau=1e-9, flower=True)
    theirs = FedAdam(initial_parameters=ndarrays_to_parameters([head0[k] for k in names]), eta=0.01,
                     beta_1=0.9, beta_2=0.99, tau=1e-9)

    class _Proxy:
        cid = "x"

    h, worst = dict(head0), 0.0
    for r in range(1, rounds + 1):
        res = [FitResult(_local_update(c, h, {"round": r, "steps": local.steps}, local, 0), len(c.y), 0, c.cid)
               for c in clients[(r - 1) * PER_ROUND:r * PER_ROUND]]
        fit = [(_Proxy(), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
            [np.asarray(h[k], np.float32) + x.update[k] for k in names]), x.num_samples, {})) for x in res]
        params, _ = theirs.aggregate_fit(r, fit, [])
        ref = dict(zip(names, parameters_to_ndarrays(params)))
        h = ours.aggregate(h, res)
        worst = max(worst, max(float(np.max(np.abs(h[k].astype(np.float64) - ref[k]))) for k in names))
        h = {k: np.asarray(ref[k], np.float32) for k in names}   # both continue from Flower's head
    return worst


def strategies(quick: bool) -> dict:
    s = {"fedavg": ("fedavg", {}), "fedavgm": ("fedavgm", {"eta": 1.0, "beta": 0.8})}
    if not quick:
        s.update(scaffold=("scaffold", {"num_clients": CLIENTS}),
                 fedadam=("fedadam", {"eta": 0.01, "tau": 1e-3, "bias_correction": True}))
    return s


def task(name: str, x, y, xt, yt, sizes, rounds: int, local: Local, quick: bool, fig: dict) -> dict:
    rng = np.random.default_rng(0)
    clients = make_clients(x, y, dirichlet_split(y, CLIENTS, ALPHA, rng), rng)
    ev = lambda h: accuracy(h, xt, yt)  # noqa: E731
    head0 = init_mlp(sizes, np.random.default_rng(0))
    out: dict = {}
    t = time.perf_counter()
    out["central"] = central(clients, head0, rounds * local.steps * 4, local, ev)
    print(f"[{name}] centralized {out['central']:.4f} ({time.perf_counter() - t:.1f}s)")
    runs = {}
    for label, (sname, params) in strategies(quick).items():
        r = run_fl(clients, head0, make(sname, **params), rounds, local, ev, per_round=PER_ROUND)
        runs[label] = r
        out[label] = tail(r.curve)
        print(f"[{name}] {label:9s} {out[label]:.4f} (last-5 mean; final {r.accuracy:.4f}; {r.seconds:.1f}s)")
    try:
        r = run_fl(clients, head0, FlowerFedAvg(), rounds, local, ev, per_round=PER_ROUND)
        out["flower_fedavg"] = tail(r.curve)
        out["fedavg_max_abs_diff_vs_flower"] = one_round_diff(clients, head0, local)
        out["fedadam_flower_mode_max_abs_diff"] = fedadam_flower_diff(clients, head0, local)
        print(f"[{name}] fedadam flower=true vs flwr FedAdam, 3 rounds of the same results: max |diff| "
              f"{out['fedadam_flower_mode_max_abs_diff']:.1e}")
        print(f"[{name}] Flower FedAvg {out['flower_fedavg']:.4f} (one round on the same updates: max |edgefleet "
              f"FedAvg - Flower| {out['fedavg_max_abs_diff_vs_flower']:.1e}; over many rounds training amplifies "
              f"float32 rounding)")
    except ImportError:
        print(f"[{name}] flwr not installed (pip install 'edgefleet[bench]'): Flower comparison skipped")
    best = max(strategies(quick), key=lambda k: out[k])
    out["best"] = best
    t = time.perf_counter()
    p = personalize(clients, runs[best].head, 40 if quick else 150, local)
    out.update({f"pers_{k}": v for k, v in p.items()})
    print(f"[{name}] personalized (FedPer, gated): per-board {p['served_per_board']:.4f} vs global "
          f"{p['global_per_board']:.4f} ({100 * (p['served_per_board'] - p['global_per_board']):+.1f} pts; "
          f"{p['personal_served_share']:.0%} of boards serve their own head; {time.perf_counter() - t:.1f}s)")
    wire = []
    for comp in (COMPRESSIONS[:1] if quick else COMPRESSIONS):
        t = time.perf_counter()
        sname, params = strategies(quick)[best]
        r = run_fl(clients, head0, make(sname, **params), rounds, local, ev, per_round=PER_ROUND, compression=comp)
        red = r.raw_update_bytes / r.update_bytes
        drop = 100 * (out[best] - tail(r.curve))
        wire.append((comp, red, drop))
        print(f"[{name}] {best} + {comp}: whole fl.update messages {r.update_bytes / rounds:.0f} B/round vs "
              f"{r.raw_update_bytes / rounds:.0f} B fp32 ({red:.1f}x less), {drop:+.2f} pts; "
              f"{time.perf_counter() - t:.1f}s")
    ok = [w for w in wire if w[2] <= 1.0]
    pick = max(ok, key=lambda w: w[1]) if ok else max(wire, key=lambda w: w[1] - w[2])
    out.update(wire_compression=pick[0], wire_reduction=pick[1], wire_acc_drop_pts=pick[2],
               wire_all=[{"compression": c, "reduction": round(r, 2), "acc_drop_pts": round(d, 2)} for c, r, d in wire])
    out["clients_obj"], out["head"] = clients, runs[best].head
    return out


def secagg(clients, head, local: Local, fig: dict, quick: bool = False) -> None:
    """One round of 10 real client updates through secure aggregation, 10 % and 30 % dropping
    (--quick: 30 % only, the goal's case)."""
    sel = clients[:PER_ROUND]
    deltas = [_local_update(c, head, {"round": 1, "steps": local.steps}, local, 0) for c in sel]
    weights = [len(c.y) for c in sel]
    for frac, key in ((0.3, "30pct"),) if quick else ((0.1, "10pct"), (0.3, "30pct")):
        try:
            r = secagg_round(deltas, weights, frac)
        except ImportError:
            print("pycryptodome not installed (pip install 'edgefleet[secagg]'): SecAgg skipped")
            return
        fig[f"secagg_max_abs_diff_{key}_dropout"] = r["max_abs_diff"]
        fig[f"secagg_overhead_bytes_ratio_{key}"] = round(r["bytes"] / r["plain_bytes"], 3)
        fig[f"secagg_seconds_{key}"] = round(r["seconds"], 3)
        print(f"SecAgg, {r['dropped']} of {PER_ROUND} drop after sharing keys: max |secure - plain| "
              f"{r['max_abs_diff']:.1e}; {r['bytes']} B in all stages vs {r['plain_bytes']} B of fp32 updates "
              f"({r['bytes'] / r['plain_bytes']:.2f}x), {r['seconds']:.2f}s for the whole round")
    fig["secagg_overhead_bytes_ratio"] = fig["secagg_overhead_bytes_ratio_30pct"]


def head_task(rounds: int, local: Local, fig: dict) -> None:
    """The earlier task: the example bundle's head over its int8 backbone (digits)."""
    from agent.serving.inference import InferenceEngine
    from controller.modeltools.example import build_example, digits_split
    from protocol.bundle import load_bundle

    work = Path(tempfile.mkdtemp(prefix="edgefleet-fl-"))
    try:
        build_example(work / "b", "small", epochs=30)
        eng = InferenceEngine(load_bundle(work / "b"))
        xtr, ytr, xte, yte = digits_split()
        feats = lambda x: np.concatenate([eng.runtime.run(x[i:i + 1]) for i in range(len(x))])  # noqa: E731
        ftr, fte = feats(xtr), feats(xte)
        out = task("head", ftr, ytr, fte, yte, [ftr.shape[1], 10], rounds, local, False, fig)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    fig.update(head_central=round(out["central"], 4), head_best=out["best"],
               head_best_accuracy=round(out[out["best"]], 4), head_fedavg=round(out["fedavg"], 4),
               head_flower_fedavg=round(out.get("flower_fedavg", float("nan")), 4),
               head_wire_reduction=round(out["wire_reduction"], 2), head_wire_acc_drop_pts=round(out["wire_acc_drop_pts"], 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    t0 = T_START
    # --quick (< 60 s on a loaded 2-core machine): 12 rounds of 10 local steps, FedAvg and FedAvgM,
    # the recommended compression, 40 personalization steps, SecAgg at 30 % only; the full run: 60
    # rounds of 20 steps, four strategies, four compressions, 150 steps, and the head task
    rounds = 12 if a.quick else 60
    local = Local(lr=0.1, steps=10 if a.quick else 20, batch_size=16, momentum=0.0)
    fig: dict = {"quick": a.quick, "clients": CLIENTS, "per_round": PER_ROUND, "alpha": ALPHA, "rounds": rounds,
                 "local_steps": local.steps}
    x, y, xt, yt = mnist1d_data(5000)
    out = task("mnist1d", x, y, xt, yt, [40, 64, 64, 10], rounds, local, a.quick, fig)
    acc = {k: round(out[k], 4) for k in strategies(a.quick)}
    fig.update(mnist1d_accuracy=acc, mnist1d_central=round(out["central"], 4), mnist1d_best=out["best"],
               mnist1d_fl_vs_central=round(out[out["best"]] / out["central"], 4),
               mnist1d_personalized_per_board=round(out["pers_served_per_board"], 4),
               mnist1d_global_per_board=round(out["pers_global_per_board"], 4),
               mnist1d_personalized_gain_pts=round(100 * (out["pers_served_per_board"] - out["pers_global_per_board"]), 2),
               wire_compression=out["wire_compression"], wire_reduction=round(out["wire_reduction"], 2),
               wire_acc_drop_pts=round(out["wire_acc_drop_pts"], 2), wire_all=out["wire_all"],
               uplink_reduction=round(out["wire_reduction"], 2))   # whole MQTT payloads, as wire_reduction
    if "flower_fedavg" in out:
        fig.update(mnist1d_flower_fedavg=round(out["flower_fedavg"], 4),
                   mnist1d_best_minus_flower_pts=round(100 * (out[out["best"]] - out["flower_fedavg"]), 2),
                   mnist1d_fedavg_max_abs_diff_vs_flower=out["fedavg_max_abs_diff_vs_flower"],
                   fedadam_flower_mode_max_abs_diff=out["fedadam_flower_mode_max_abs_diff"])
    else:
        fig["mnist1d_best_minus_flower_pts"] = None
    t = time.perf_counter()
    secagg(out["clients_obj"], out["head"], local, fig, a.quick)
    print(f"SecAgg {time.perf_counter() - t:.1f}s; all so far {time.perf_counter() - t0:.1f}s")
    if not a.quick:
        head_task(rounds, local, fig)
    fig["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
