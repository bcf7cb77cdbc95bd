"""``fleetctl report rounds --png FILE``: accuracy, loss and uplink bytes per round (matplotlib extra)."""
from __future__ import annotations

import json

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
    if as_json or not png:
        click.echo(json.dumps({"run_id": s["run_id"], "rounds": rows}, indent=2))
    if png:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise click.ClickException("PNG reports need matplotlib: pip install 'edgefleet[report]'") from None
        x = [r["round"] for r in rows]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, key, title in zip(axes, ("accuracy", "mean_train_loss", "uplink_bytes"),
                                  ("global head accuracy", "mean client train loss", "uplink bytes")):
            ax.plot(x, [r[key] if r[key] is not None else float("nan") for r in rows], marker="o")
            ax.set_title(title)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        fig.suptitle(f"{s['run_id']} ({s['config'].get('mode')} {s['config'].get('strategy')})")
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        click.echo(f"wrote {png}", err=True)
