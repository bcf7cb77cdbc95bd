"""``fleetctl round …``: start federated runs and watch them.

The CLI writes the run into the registry's SQLite file; ``fleetctl serve`` (which owns
the broker side) picks it up within half a second and drives it. A restarted service
resumes running runs from the same file.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from .. import audit
from .params import DURATION, FRACTION, KEY_VALUE, POSITIVE_DURATION, checked_settings


def load_head(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    f = p / "head.npz" if p.is_dir() else p
    try:
        with np.load(f, allow_pickle=False) as z:
            head = {k: z[k].astype(np.float32) for k in z.files}
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"cannot read a head from {f}: {exc}", param_hint="--bundle") from None
    if not head or not all(k.startswith("dense") for k in head):
        raise click.BadParameter(f"{f} holds no dense{{i}}.weight/bias tensors", param_hint="--bundle")
    if p.is_dir() and (p / "manifest.json").exists():   # only the layers the bundle declares trainable
        from protocol.layers import LayerError, federated, trainable_tensors

        try:
            head = federated(head, trainable_tensors(json.loads((p / "manifest.json").read_text()), head))
        except (LayerError, ValueError) as exc:
            raise click.BadParameter(f"{p}: {exc}", param_hint="--bundle") from None
    return head


#: the eval file's copy of the bundle's whole head (controller/fl/runner.py ``evaluator_for``)
FULL_HEAD_PREFIX = "head__"


def _eval_features(bundle: str, out: Path) -> Path | None:
    """Backbone features of the bundle's eval set (ONNX backbones; needs the tools extra)."""
    p = Path(bundle)
    try:
        m = json.loads((p / "manifest.json").read_text())
        ev = next(n for n, e in m["files"].items() if e.get("role") == "eval")
        bb = next(n for n, e in m["files"].items() if e.get("role") == "backbone")
        if not bb.endswith(".onnx"):
            return None
        import onnxruntime as ort

        with np.load(p / ev, allow_pickle=False) as z:
            x, y = z["x"].astype(np.float32), z["y"]
        sess = ort.InferenceSession(str(p / bb), providers=["CPUExecutionProvider"])
        feats = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        head = next((n for n, e in m["files"].items() if e.get("role") == "head"), None)
        with np.load(p / head, allow_pickle=False) as z:
            # the whole head: a run over chosen layers carries only those, the evaluator puts them back
            full = {f"{FULL_HEAD_PREFIX}{k}": z[k].astype(np.float32) for k in z.files}
    except (OSError, ValueError, KeyError, StopIteration, ImportError, TypeError):
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, features=feats, y=y, **full)
    return out


def _store(ctx: click.Context, create: bool):
    from ..fl.store import RoundStore

    cfg = ctx.obj.cfg()
    path = cfg.db_path
    if not create and cfg.db_is_sqlite and not os.path.exists(path):
        raise click.ClickException(f"no registry at {path} (is `fleetctl serve` running with this --db?)")
    if create and cfg.db_is_sqlite and not Path(path).resolve().parent.is_dir():
        raise click.ClickException(f"no directory for the registry {path} (is --db right?)")
    from ..db import DatabaseUnavailable

    try:
        return RoundStore.open(path)
    except DatabaseUnavailable as exc:
        raise click.ClickException(str(exc)) from None


def _only_devices(ctx: click.Context, to: tuple[str, ...], tag: str | None) -> tuple[str, ...] | None:
    """``--to`` ids (checked as topic levels) or the devices tagged ``--tag`` now; None: any device."""
    from .select import checked_ids

    ids = checked_ids(to)
    if ids is not None:
        return tuple(dict.fromkeys(ids))
    if tag is None:
        return None
    from .select import tags_reader

    devs = tuple(tags_reader(ctx.obj.registry())(tag))
    if not devs:
        raise click.BadParameter(f"no device has tag {tag!r}", param_hint="--tag")
    return devs


def _check_compress(d: dict[str, Any]) -> None:
    from protocol.compression import Compressor

    Compressor.from_config(d)   # what every device runs on the task's settings


def _check_dp(d: dict[str, Any]) -> None:
    from ..fl.privacy import DPConfig

    DPConfig.from_dict(d)   # what the service's DP wrapper runs


@click.group()
def round() -> None:  # noqa: A001 - the command is called "round"
    """Federated rounds: start, status, history."""


@round.command("start")
@click.option("--bundle", required=True, help="bundle dir (or head .npz) holding the initial global head")
@click.option("--strategy", default="fedavg", show_default=True, help="fedavg, fedprox, fedadam, fedyogi, median, "
              "trimmed_mean, krum, multikrum, fedbuff, fedavgm, scaffold")
@click.option("--strategy-param", "sparams", multiple=True, type=KEY_VALUE, help="KEY=VALUE for the strategy")
@click.option("--clients", default=10, show_default=True, type=click.IntRange(1, 100000))
@click.option("--min-clients", default=None, type=click.IntRange(1, 100000), help="quorum (default: half)")
@click.option("--rounds", "n_rounds", default=3, show_default=True, type=click.IntRange(1, 10000))
@click.option("--deadline", default="60s", show_default=True, type=DURATION, help="per-round deadline, e.g. 60s")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(1, 100000), help="local steps (default)")
@click.option("--lr", default=0.05, show_default=True, type=click.FloatRange(0, 10, min_open=True))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 65536))
@click.option("--prox-mu", default=0.0, show_default=True, type=click.FloatRange(0, 100))
@click.option("--min-samples", default=8, show_default=True, type=click.IntRange(0, 10**9))
@click.option("--async", "is_async", is_flag=True, help="buffered asynchronous mode (FedBuff)")
@click.option("--buffer", default=2, show_default=True, type=click.IntRange(1, 100000), help="async: updates per version")
@click.option("--max-staleness", default=4, show_default=True, type=click.IntRange(0, 1000))
@click.option("--secagg", "secagg", multiple=True, type=KEY_VALUE, help="KEY=VALUE secure aggregation "
              "(devices mask their updates; the controller sees only the sum), e.g. max_dropout=0.3 stage_s=15")
@click.option("--compress", "compress", multiple=True, type=KEY_VALUE, callback=checked_settings("compression", _check_compress),
              help="KEY=VALUE compression option sent to devices: topk=FRACTION int8=BOOL zstd=BOOL "
              "error_feedback=BOOL level=1..22, e.g. topk=0.1 int8=true")
@click.option("--dp", "dp", multiple=True, type=KEY_VALUE, callback=checked_settings("dp", _check_dp),
              help="KEY=VALUE differential privacy: clip, noise, delta, sample_rate, e.g. clip=1.0 noise=0.8")
@click.option("--group", default=None, help="only devices of this group")
@click.option("--to", "to", multiple=True, help="only these device ids (comma-separated or repeated)")
@click.option("--tag", default=None, help="only devices with this tag (fleetctl device tag)")
@click.option("--all", "all_", is_flag=True, help="any eligible device (the default)")
@click.option("--max-update-norm", default=1e4, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--start-timeout", default="120s", show_default=True, type=POSITIVE_DURATION,
              help="fail the run when no round can start for this long (too few eligible devices)")
@click.option("--max-cpu", default=90.0, show_default=True, type=click.FloatRange(0, 100),
              help="devices whose CPU is busier than this (percent) are not selected")
@click.option("--deploy", is_flag=True, help="when the run is done, roll its head out as a new version of --bundle "
              "(a head-only signed patch, canary first, health-gated on every device)")
@click.option("--deploy-canary", default="10%", show_default=True, type=FRACTION, help="with --deploy: share in the first wave")
@click.option("--deploy-max-failures", default=0, show_default=True, type=click.IntRange(0))
@click.option("--wait/--no-wait", default=True, show_default=True, help="follow progress until the run ends")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def start(ctx: click.Context, bundle: str, strategy: str, sparams: tuple[tuple[str, Any], ...], clients: int,
          min_clients: int | None, n_rounds: int, deadline: float, steps: int, lr: float, batch_size: int,
          prox_mu: float, min_samples: int, is_async: bool, buffer: int, max_staleness: int,
          secagg: tuple[tuple[str, Any], ...], compress: dict[str, Any], dp: dict[str, Any], group: str | None,
          to: tuple[str, ...], tag: str | None, all_: bool, max_update_norm: float, seed: int,
          start_timeout: float, max_cpu: float, deploy: bool, deploy_canary: float, deploy_max_failures: int, wait: bool,
          as_json: bool) -> None:
    """Start a federated run (fleetctl serve executes it)."""
    from ..fl.engine import RunConfig, RunConfigError

    if sum(bool(x) for x in (to, group, tag, all_)) > 1:
        raise click.UsageError("pick the devices with at most one of --to, --group, --tag or --all")
    only = _only_devices(ctx, to, tag)
    head = load_head(bundle)
    try:
        cfg = RunConfig(strategy=strategy, strategy_params=dict(sparams), rounds=n_rounds,
                        mode="async" if is_async else "sync", clients=clients,
                        min_clients=min_clients or max(1, clients // 2), deadline_s=deadline,
                        local_steps=steps, lr=lr, batch_size=batch_size, prox_mu=prox_mu, min_samples=min_samples,
                        max_update_norm=max_update_norm, compression=dict(compress),
                        dp=dict(dp) or None, secagg=dict(secagg) or None, buffer=min(buffer, clients), max_staleness=max_staleness,
                        group=group, devices=only, seed=seed, max_cpu_percent=max_cpu, start_timeout_s=start_timeout,
                        deploy=_deploy_spec(bundle, deploy_canary, deploy_max_failures) if deploy else None)
    except RunConfigError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        from ..fl.runner import strategy_for

        strategy_for(cfg)   # what `fleetctl serve` will build: unknown names, bad params, a conflicting mu
    except (KeyError, TypeError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--strategy") from None
    store = _store(ctx, create=True)
    run_id = time.strftime("run-%Y%m%d-%H%M%S-") + os.urandom(2).hex()
    eval_file = _eval_features(bundle, ctx.obj.cfg().state_dir / "runs" / f"{run_id}-eval.npz")
    if eval_file:
        from dataclasses import replace

        cfg = replace(cfg, eval_file=str(eval_file))
    store.create_run(run_id, cfg.to_dict(), head)
    audit.cli_hook("round.start", run_id, strategy=strategy, rounds=n_rounds, clients=clients)
    if not as_json:
        click.echo(f"{run_id}: {cfg.mode} {strategy}, {n_rounds} rounds, up to {clients} clients, "
                   f"deadline {cfg.deadline_s:g}s")
    if wait:
        _follow(store, run_id, as_json)
    elif as_json:
        click.echo(json.dumps({"run_id": run_id}))


#: ``round start --wait`` exits 0 only when the run reached its rounds (2 is click's usage error)
EXIT_CODES = {"done": 0, "failed": 1, "cancelled": 1, "partial": 3, "stopped": 4}


def _deploy_spec(bundle: str, canary: float, max_failures: int) -> dict[str, Any]:
    if not (Path(bundle) / "manifest.json").is_file():
        raise click.BadParameter("--deploy needs --bundle to be a bundle directory", param_hint="--bundle")
    return {"bundle": str(Path(bundle).resolve()), "canary": canary, "max_failures": max_failures}


#: ``round start --wait``: the same "waiting" line again at most this often (a changed one at once)
WAITING_EVERY_S = 10.0


def _follow(store, run_id: str, as_json: bool) -> None:
    from ..fl.engine import TERMINAL

    said, said_at = None, 0.0
    with click.progressbar(length=store.run(run_id).config["rounds"], label="rounds", file=sys.stderr,
                           show_pos=True) as bar:
        done = 0
        while True:
            run = store.run(run_id)
            finished = [r for r in store.rounds(run_id) if r.status in ("aggregated", "failed")]
            if len(finished) > done:
                bar.update(len(finished) - done)
                done = len(finished)
            if run.status in TERMINAL:
                break
            now = time.monotonic()
            if run.waiting and (run.waiting != said or now - said_at >= WAITING_EVERY_S):
                click.echo(f"\nwaiting for devices: {run.waiting}", err=True)
                said, said_at = run.waiting, now
            time.sleep(0.3)
    summary = _run_json(store, run_id)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        if summary["error"]:
            click.echo(f"{run_id}: {summary['status']}: {summary['error']}", err=True)
    else:
        _print_history(summary)
    sys.exit(EXIT_CODES.get(summary["status"], 1))


def _run_json(store, run_id: str) -> dict[str, Any]:
    run = store.run(run_id)
    rounds = []
    for r in store.rounds(run_id):
        ups = store.updates(run_id, r.round_no)
        rounds.append({"round": r.round_no, "status": r.status, "selected": list(r.selected),
                       "tasks_sent": sorted(r.tasks_sent), "started": r.started, "deadline": r.deadline,
                       "finished": r.finished, "metrics": r.metrics,
                       "updates": [{"device": u.device_id, "accepted": u.accepted, "reason": u.reason,
                                    "num_samples": u.num_samples, "base_version": u.base_version,
                                    "meta": u.meta} for u in ups]})
    return {"run_id": run.id, "status": run.status, "error": run.error, "waiting": run.waiting, "config": run.config,
            "round": run.round_no, "global_version": run.global_version, "created": run.created, "rounds": rounds}


def _print_history(s: dict[str, Any]) -> None:
    from ..table import render

    click.echo(f"{s['run_id']}: {s['status']}  version {s['global_version']}"
               + (f"  error: {s['error']}" if s["error"] else "")
               + (f"\n  waiting for devices: {s['waiting']}" if s.get("waiting") else ""))
    rows = []
    for r in s["rounds"]:
        m = r["metrics"] or {}
        rej = sum(1 for u in r["updates"] if not u["accepted"])
        rows.append([r["round"], r["status"], len(r["selected"]), m.get("received", 0), rej,
                     m.get("accuracy"), m.get("mean_train_loss"), m.get("uplink_bytes"), m.get("dp_epsilon"),
                     m.get("duration_s"), m.get("reason", "")])
    if rows:
        click.echo(render(["ROUND", "STATUS", "SELECTED", "UPDATES", "REJECTED", "ACCURACY", "LOSS", "UPLINK B",
                           "EPSILON", "SECONDS", "NOTE"], rows))
    for r in s["rounds"]:   # site aggregation (docs/sites.md): what each site's one update stood for
        for site, v in sorted(((r["metrics"] or {}).get("sites") or {}).items()):
            click.echo(f"  round {r['round']} site {site} (relay {v['relay']}): {len(v['boards'])} boards "
                       f"({', '.join(v['boards'])}), {v['samples']} samples, {v['bytes']} B")


@round.command("status")
@click.argument("run_id", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, run_id: str | None, as_json: bool) -> None:
    """The current (or given) run."""
    store = _store(ctx, create=False)
    runs = [store.run(run_id)] if run_id else store.runs(limit=1)
    if not runs or runs[0] is None:
        raise click.ClickException("no such run" if run_id else "no runs yet")
    s = _run_json(store, runs[0].id)
    click.echo(json.dumps(s, indent=2) if as_json else "")
    if not as_json:
        _print_history(s)


@round.command("stop")
@click.argument("run_id")
@click.option("--reason", default="stopped by the operator", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def stop(ctx: click.Context, run_id: str, reason: str, as_json: bool) -> None:
    """End RUN_ID now: status `stopped`, its open round closes unaggregated; rounds already
    aggregated (and the global head) are kept. Updates arriving later are refused."""
    store = _store(ctx, create=False)
    run = store.run(run_id)
    if run is None:
        raise click.ClickException(f"no run {run_id!r}")
    if not store.stop_run(run_id, reason):
        raise click.ClickException(f"{run_id} is {run.status}: only a pending or running run can be stopped")
    audit.cli_hook("round.stop", run_id, reason=reason)
    s = _run_json(store, run_id)
    if as_json:
        click.echo(json.dumps(s, indent=2))
    else:
        click.echo(f"{run_id}: stopped at round {s['round']}, global version {s['global_version']}")


@round.command("history")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def history(ctx: click.Context, limit: int, as_json: bool) -> None:
    """Past runs, newest first."""
    from ..table import render

    store = _store(ctx, create=False)
    runs = store.runs(limit=limit)
    if as_json:
        click.echo(json.dumps({"runs": [_run_json(store, r.id) for r in runs]}, indent=2))
        return
    click.echo(render(["RUN", "STATUS", "MODE", "STRATEGY", "ROUND", "VERSION", "ERROR"],
                      [[r.id, r.status, r.config.get("mode"), r.config.get("strategy"), r.round_no, r.global_version,
                        (r.error or "")[:60]] for r in runs]))
