"""``fleetctl report rounds [--png FILE] [--json]``: accuracy, loss and uplink bytes per round
(a table; ``--json``; a chart with the matplotlib extra)."""
from __future__ import annotations

import json
from typing import Any

import click


@click.group()
def report() -> None:
    """Reports (PNG needs: pip install 'edgefleet[report]')."""


@report.command("rounds")
@click.argument("run_id", required=False)
@click.option("--png", "png", type=click.Path(dir_okay=False), default=None, help="write a chart here")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def rounds(ctx: click.Context, run_id: str | None, png: str | None, as_json: bool) -> None:
    """Per-round figures of a run (default: the newest)."""
    from .round import _run_json, _store

    store = _store(ctx, create=False)
    runs = [store.run(run_id)] if run_id else store.runs(limit=1)
    if not runs or runs[0] is None:
        raise click.ClickException("no such run" if run_id else "no runs yet")
    s = _run_json(store, runs[0].id)
    rows = [{"round": r["round"], "status": r["status"], **{k: (r["metrics"] or {}).get(k) for k in
            ("accuracy", "mean_train_loss", "uplink_bytes", "received", "dp_epsilon")}} for r in s["rounds"]]
    if as_json:
        click.echo(json.dumps({"run_id": s["run_id"], "rounds": rows}, indent=2))
    elif not png:
        from ..table import render

        click.echo(f"{s['run_id']}: {s['status']} ({s['config'].get('mode')} {s['config'].get('strategy')})")
        click.echo(render(["ROUND", "STATUS", "ACCURACY", "LOSS", "UPLINK B", "UPDATES", "EPSILON"],
                          [[r["round"], r["status"], r["accuracy"], r["mean_train_loss"], r["uplink_bytes"],
                            r["received"], r["dp_epsilon"]] for r in rows]))
    if png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise click.ClickException("PNG reports need matplotlib: pip install 'edgefleet[report]'") from None
        fig = chart(plt, rows, f"{s['run_id']} ({s['config'].get('mode')} {s['config'].get('strategy')})")
        try:
            fig.savefig(png, dpi=110)
        except OSError as exc:
            raise click.ClickException(f"cannot write {png}: {exc.strerror or exc}") from None
        click.echo(f"wrote {png}", err=True)


def chart(plt: Any, rows: list[dict[str, Any]], title: str) -> Any:
    """The three per-round panels (accuracy, loss, uplink bytes) as a matplotlib figure."""
    x = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, name in zip(axes, ("accuracy", "mean_train_loss", "uplink_bytes"),
                             ("global head accuracy", "mean client train loss", "uplink bytes")):
        ax.plot(x, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")
        if key == "uplink_bytes":
            # from 0: equal byte counts every round must look flat, not a ±1 byte zoom
            top = max([r[key] for r in rows if r[key] is not None] or [0])
            ax.set_ylim(0, top * 1.15 if top else 1)
    fig.suptitle(title)
    fig.tight_layout()
    return fig
