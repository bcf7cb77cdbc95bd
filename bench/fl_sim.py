"""Simulated fleets for bench/federated.py: a proper Dirichlet split, rounds run the way the
``RoundEngine`` runs them (its selection and the strategy's configure/validate/aggregate), clients that train with the agent's own
numpy trainer (SCAFFOLD's client maths from ``agent.learning.scaffold``), FedPer-style
personalization with the agent's quality gate, and whole-message wire sizes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import random
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from agent.learning import scaffold as sc
from agent.learning.trainer import HeadTrainer, TrainConfig, accuracy
from controller.fl.engine import RunConfig
from controller.fl.selection import ClientInfo, select
from controller.fl.strategies import FitResult, Strategy, validate_update
from protocol.binary import encode_frame
from protocol.compression import Compressor, decode_update
from protocol.envelope import Envelope

Head = dict[str, np.ndarray]


def dirichlet_split(y: np.ndarray, clients: int, alpha: float, rng: np.random.Generator,
                    per_client: int | None = None) -> list[np.ndarray]:
    """Each client draws its own class mix q ~ Dir(α·1) and then its samples one by one: a class
    from q (renormalised over the classes not used up yet), an unused sample of that class.
    Every client gets the same number of samples; no client is left holding every class."""
    classes = np.unique(y)
    pools = {int(c): list(rng.permutation(np.flatnonzero(y == c))) for c in classes}
    n = per_client or len(y) // clients
    out = []
    for _ in range(clients):
        q = rng.dirichlet([alpha] * len(classes))
        mine = []
        for _ in range(n):
            avail = np.array([len(pools[int(c)]) > 0 for c in classes], float)
            p = q * avail
            if p.sum() <= 0:
                p = avail
            c = int(classes[rng.choice(len(classes), p=p / p.sum())])
            mine.append(pools[c].pop())
        out.append(np.array(mine, np.int64))
    return out


def init_mlp(sizes: Sequence[int], rng: np.random.Generator) -> Head:
    h = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        h[f"dense{i}.weight"] = (rng.normal(0, np.sqrt(2.0 / a), (a, b))).astype(np.float32)
        h[f"dense{i}.bias"] = np.zeros(b, np.float32)
    return h


@dataclass
class Client:
    cid: str
    x: np.ndarray
    y: np.ndarray
    xval: np.ndarray
    yval: np.ndarray
    xtest: np.ndarray
    ytest: np.ndarray
    ci: Head | None = None                      # SCAFFOLD's cᵢ (the agent keeps it in scaffold.npz)
    comp: Compressor | None = None


def make_clients(x, y, parts, rng, val=0.15, test=0.15) -> list[Client]:
    out = []
    for i, p in enumerate(parts):
        p = rng.permutation(p)
        nv, nt = max(1, int(len(p) * val)), max(1, int(len(p) * test))
        v, t, tr = p[:nv], p[nv:nv + nt], p[nv + nt:]
        out.append(Client(f"c{i:03d}", x[tr], y[tr], x[v], y[v], x[t], y[t]))
    return out


@dataclass(frozen=True)
class Local:
    lr: float = 0.05
    steps: int = 20
    batch_size: int = 16
    momentum: float = 0.9
    weight_decay: float = 1e-4


class FlowerFedAvg(Strategy):
    """Flower's own ``FedAvg.aggregate_fit`` fed the same client results (the bench's baseline)."""

    name = "flower_fedavg"

    def __init__(self) -> None:
        from flwr.server.strategy import FedAvg

        self.inner = FedAvg()

    def aggregate(self, global_head, results, failures=()):
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

        names = sorted(global_head)

        class _Proxy:
            cid = "x"

        fit = [(_Proxy(), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(
            [np.asarray(global_head[k], np.float32) + r.update[k] for k in names]), r.num_samples, {}))
            for r in results]
        params, _ = self.inner.aggregate_fit(1, fit, [])
        return {k: np.asarray(a, np.float32) for k, a in zip(names, parameters_to_ndarrays(params))}


@dataclass
class RunResult:
    accuracy: float
    head: Head
    curve: list[float] = field(default_factory=list)
    update_bytes: int = 0          # whole fl.update frames (envelope + tensors or blob)
    raw_update_bytes: int = 0      # the same updates as whole fp32 frames
    seconds: float = 0.0


def _frame(cid: str, body: Mapping[str, Any], tensors=None, blob: bytes = b"") -> bytes:
    return encode_frame(Envelope(kind="fl.update", sender=cid, body=dict(body)), tensors, blob)


def run_fl(clients: Sequence[Client], head0: Head, strategy: Strategy, rounds: int, local: Local,
           evaluate: Callable[[Head], float], *, per_round: int = 10, seed: int = 0,
           compression: Mapping[str, Any] | None = None) -> RunResult:
    """``rounds`` rounds of ``per_round`` clients, each round as ``RoundEngine`` runs it: the
    engine's selection (``select`` over the clients' telemetry, seeded), the strategy's
    ``configure``/``task_tensors``, ``validate_update`` against ``expected_update``, then
    ``aggregate`` (the engine's SQLite store is left out: it would dominate the time)."""
    t0 = time.perf_counter()
    for c in clients:   # every run starts from fresh boards: no compressor residual, no SCAFFOLD cᵢ
        c.comp, c.ci = None, None
    cfg = RunConfig(rounds=rounds, clients=per_round, min_clients=per_round, local_steps=local.steps, lr=local.lr,
                    batch_size=local.batch_size, min_samples=1, seed=seed, deadline_s=3600)
    policy, rng = cfg.policy(), random.Random(seed)
    infos = [ClientInfo(c.cid, True, len(c.y)) for c in clients]
    by_id = {c.cid: c for c in clients}
    res = RunResult(0.0, head0)
    head = dict(head0)
    for r in range(1, rounds + 1):
        sel = select(infos, policy, rng)
        base = {"run_id": "bench", "base_version": r - 1, "lr": local.lr, "batch_size": local.batch_size,
                "compression": dict(compression or {})}
        tasks = strategy.configure(r, list(sel.selected), base)
        tensors = strategy.task_tensors(head)
        expected = strategy.expected_update(head)
        results = []
        for cid in sel.selected:
            c = by_id[cid]
            body = {**tasks[cid], "steps": sel.steps[cid]}
            delta = _local_update(c, tensors, body, local, seed)
            meta = {"run_id": "bench", "round": r, "base_version": r - 1, "num_samples": len(c.y),
                    "steps": local.steps, "train_loss": 0.0}
            raw = _frame(c.cid, {**meta, "encoding": "raw"}, delta)
            res.raw_update_bytes += len(raw)
            if compression:
                c.comp = c.comp or Compressor.from_config(dict(compression))
                blob = c.comp.encode(delta)
                res.update_bytes += len(_frame(c.cid, {**meta, "encoding": "compressed"}, None, blob))
                delta = decode_update(blob, {k: v.shape for k, v in delta.items()})
            else:
                res.update_bytes += len(raw)
            validate_update(delta, expected, max_norm=cfg.max_update_norm)
            results.append(FitResult(delta, len(c.y), 0, cid))
        new = strategy.aggregate(head, results, [])
        if new is None:
            raise RuntimeError(f"round {r}: no new model")
        head = new
        res.curve.append(evaluate(head))
    res.head, res.accuracy = head, evaluate(head)
    res.seconds = time.perf_counter() - t0
    return res


def _local_update(c: Client, tensors: Mapping[str, np.ndarray], body: Mapping[str, Any], local: Local,
                  seed: int) -> Head:
    """What the agent does with a task: train from the global head, return the update tensors."""
    scaffold = bool(body.get("scaffold"))
    if scaffold:
        head, cglob = sc.split_task(tensors)
        c.ci = c.ci or {k: np.zeros_like(v) for k, v in head.items()}
        corr = sc.correction(cglob, c.ci)
    else:
        head, corr = {k: np.asarray(v, np.float32) for k, v in tensors.items()}, None
    cfg = TrainConfig(lr=local.lr, momentum=local.momentum, weight_decay=local.weight_decay,
                      batch_size=local.batch_size, prox_mu=float(body.get("prox_mu") or 0.0),
                      seed=seed * 100003 + int(body["round"]) * 1009 + int(c.cid[1:]))
    tr = HeadTrainer(head, cfg, correction=corr)
    rep = tr.train(c.x, c.y, int(body["steps"]), yield_every=0)
    y = tr.head()
    if scaffold:
        c.ci, dci = sc.new_control(head, y, cglob, c.ci, rep.steps, local.lr / (1 - local.momentum))
        return sc.update_tensors(head, y, dci)
    return {k: (y[k] - head[k]).astype(np.float32) for k in head}


def central(clients: Sequence[Client], head0: Head, steps: int, local: Local, evaluate) -> float:
    x = np.concatenate([c.x for c in clients])
    y = np.concatenate([c.y for c in clients])
    tr = HeadTrainer(head0, TrainConfig(lr=local.lr, momentum=0.9, weight_decay=local.weight_decay,
                                        batch_size=32, seed=1))
    tr.train(x, y, steps, yield_every=0)
    return evaluate(tr.head())


def personalize(clients: Sequence[Client], head: Head, steps: int, local: Local) -> dict[str, float]:
    """FedPer-style: each board keeps the global body and fine-tunes its own last layer on its
    data; the quality gate serves the personal head only if it is at least as good as the global
    one on the board's validation slice. Reported on each board's test slice (never gated on)."""
    last = max(int(k[5:k.index(".")]) for k in head)
    frozen = {k for k in head if not k.startswith(f"dense{last}.")}
    glob, served, pers = [], [], []
    for i, c in enumerate(clients):
        tr = HeadTrainer(head, TrainConfig(lr=local.lr, momentum=0.9, weight_decay=local.weight_decay,
                                           batch_size=local.batch_size, seed=7 + i), frozen=frozen)
        tr.train(c.x, c.y, steps, yield_every=0)
        mine = tr.head()
        g_val, p_val = accuracy(head, c.xval, c.yval), accuracy(mine, c.xval, c.yval)
        g, p = accuracy(head, c.xtest, c.ytest), accuracy(mine, c.xtest, c.ytest)
        glob.append(g)
        pers.append(p)
        served.append(p if p_val >= g_val else g)
    return {"global_per_board": float(np.mean(glob)), "personal_per_board": float(np.mean(pers)),
            "served_per_board": float(np.mean(served)), "personal_served_share": float(np.mean(
                [s == p and p != g for s, p, g in zip(served, pers, glob)]))}


def secagg_round(deltas: Sequence[Head], weights: Sequence[int], drop_fraction: float) -> dict[str, float]:
    """One round of FedAvg through secure aggregation with ``drop_fraction`` of the clients
    dropping after they shared keys (before masking): the result vs the plain weighted mean of
    the survivors, and the bytes and seconds it cost vs plain fp32 update frames."""
    from controller.fl.aggregate import weighted_average
    from protocol.secagg_wire import run_local

    names = sorted(deltas[0])
    vecs = {f"c{i:03d}": np.concatenate([(w * d[k].astype(np.float64)).ravel() for k in names] + [[float(w)]])
            for i, (d, w) in enumerate(zip(deltas, weights))}
    n_drop = int(round(drop_fraction * len(vecs)))
    drop = sorted(vecs)[:n_drop]
    t = time.perf_counter()
    total, srv, sizes = run_local(vecs, drop_before_mask=drop, max_dropout=max(drop_fraction, 0.3))
    secs = time.perf_counter() - t
    surv = [i for i, k in enumerate(sorted(vecs)) if k not in drop]
    mean = weighted_average([deltas[i] for i in surv], [weights[i] for i in surv])
    flat = np.concatenate([mean[k].astype(np.float64).ravel() for k in names])
    got = total[:-1] / total[-1]
    plain = sum(len(_frame(f"c{i:03d}", {"run_id": "bench", "round": 1, "base_version": 0, "num_samples": 1,
                                         "encoding": "raw"}, deltas[i])) for i in surv)
    return {"max_abs_diff": float(np.max(np.abs(got - flat))), "bytes": int(sum(sizes.values())),
            "plain_bytes": int(plain), "seconds": secs, "dropped": n_drop}
