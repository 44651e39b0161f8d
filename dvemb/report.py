"""What a finished run shows: the influence-by-step plot, the top samples table and report.md."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from dvemb.store.atomic import atomic_path
from dvemb.store.rundir import RunDir

TOP_N = 10


def plot_path(run: RunDir) -> Path:
    return run.root / "plots" / "influence_by_step.png"


def influence_by_step(run: RunDir) -> pl.DataFrame:
    """Mean and total score per training step at the final checkpoint (step, epoch, mean_score, total_score, n)."""
    occ = pl.read_parquet(run.occurrences)
    final = occ.filter(pl.col("checkpoint") == occ["checkpoint"].max())
    return (
        final.group_by("step", "epoch")
        .agg(mean_score=pl.col("score").mean(), total_score=pl.col("score").sum(), n=pl.len())
        .sort("step")
    )


def phases(run: RunDir) -> dict | None:
    """The early/middle/late phases recorded in curation/plan.json, if any."""
    return json.loads(run.plan.read_text()).get("phases") if run.plan.exists() else None


def plot_influence(run: RunDir, per_step: pl.DataFrame) -> Path:
    """PNG of the mean occurrence score per step, segment boundaries and phases marked (RUN/plots/)."""
    fig = Figure(figsize=(7, 3.2), dpi=100)
    ax = fig.add_subplot()
    if ph := phases(run):
        if ph["early_end"] > 0:
            ax.axvspan(0, ph["early_end"], color="tab:green", alpha=0.1, label="early phase")
        if ph["late_start"] < ph["total_steps"]:
            ax.axvspan(ph["late_start"], ph["total_steps"], color="tab:orange", alpha=0.1, label="late phase")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", fontsize=8, frameon=False)
    ax.plot(per_step["step"], per_step["mean_score"], lw=1.2, color="tab:blue")
    ax.axhline(0.0, color="black", lw=0.6)
    for b in run.boundaries[1:-1]:
        ax.axvline(b, color="tab:gray", lw=0.8, ls="--")
    ax.set_xlabel("training step (dashed: segment boundaries)")
    ax.set_ylabel("mean score at final checkpoint")
    ax.set_title("Influence of each step's batch on the final model (positive = helped)")
    fig.tight_layout()
    path = plot_path(run)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def top_samples(run: RunDir, n: int = TOP_N) -> list[dict]:
    """The ``n`` most valuable and ``n`` most harmful training samples (rows for a table artifact)."""
    samples = pl.read_parquet(run.samples)
    if "label" in pl.read_parquet_schema(run.data("train")):
        labels = pl.read_parquet(run.data("train"), columns=["sample_id", "label"])
        samples = samples.join(labels, on="sample_id", how="left")
    best = samples.sort("value", descending=True).head(n).with_columns(group=pl.lit("most valuable"))
    worst = samples.sort("value").head(n).with_columns(group=pl.lit("most harmful"))
    extra = [c for c in ("value_early", "value_late") if c in samples.columns]
    rows = []
    for rank, r in enumerate(best.to_dicts() + worst.to_dicts()):
        row = {"group": r["group"], "rank": rank % n + 1, "sample_id": r["sample_id"], "label": r.get("label")}
        row |= {c: f"{r[c]:+.3e}" for c in ("value", *extra)}
        rows.append(row | {"n_occurrences": r["n_occurrences"]})
    return rows


def summary_markdown(run: RunDir, timings: dict[str, float]) -> str:
    """Run summary: config highlights, steps, boundaries, curation outcome, stage timings."""
    meta = run.meta()
    c = meta["config"]
    steps = pl.read_parquet(run.steps)
    plan = json.loads(run.plan.read_text()) if run.plan.exists() else {}
    d, m, t, cap = c["data"], c["model"], c["train"], c["capture"]
    model = f"{m['kind']} hidden={m['hidden']} {m['activation']}" if m["kind"] == "mlp" else f"gpt {m['n_layer']}L"
    noise_kind = d.get("label_noise_kind", "uniform")  # runs recorded before the option existed
    lines = [
        f"# dvemb run `{c['name']}`",
        "",
        f"Run directory: `{run.root}`",
        "",
        "| setting | value |",
        "|---|---|",
        f"| data | {d['source']} (batch {d['batch_size']}, label noise {d['label_noise']} {noise_kind}) |",
        f"| model | {model} |",
        f"| training | {t['epochs']} epochs, {t['optimizer']} lr {t['lr']} ({t['schedule']}), wd {t['weight_decay']} |",
        f"| capture | k_a={cap['k_a']}, k_s={cap['k_s']}, {cap['dtype']} |",
        f"| embed / score | {c['embed']['segments']} segments, {c['score']['mode']} mode |",
        f"| curation | drop={c['curate']['drop']} |",
        "",
        "## Trajectory",
        "",
        f"- steps: **{steps.height}** over {steps['epoch'].n_unique()} epochs; "
        f"loss {steps['loss'][0]:.4f} → {steps['loss'][-1]:.4f}",
        f"- segment boundaries (checkpoints): `{run.boundaries}`",
    ]
    if ph := plan.get("phases"):
        lines.append(
            f"- phases ({ph['method']}): early [0, {ph['early_end']}), middle [{ph['early_end']}, {ph['late_start']}), "
            f"late [{ph['late_start']}, {ph['total_steps']})"
        )
    if plan:
        lines.append(
            f"- curated: kept **{plan['n_kept']}** of {plan['n_train']} training rows "
            f"(dropped {plan['n_dropped']}), ordered by {plan['order']}"
        )
    lines += ["", "## Timings", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in timings.items()]
    lines += [f"| **total** | **{sum(timings.values()):.1f}** |"]
    return "\n".join(lines) + "\n"


def plot_markdown(run: RunDir, per_step: pl.DataFrame, png: Path) -> str:
    """The plot inline (base64 PNG), its file path, and per-epoch totals."""
    data = base64.b64encode(png.read_bytes()).decode()
    per_epoch = (
        per_step.group_by("epoch")
        .agg(pl.col("total_score").sum(), pl.col("mean_score").mean(), pl.col("n").sum())
        .sort("epoch")
    )
    lines = [
        "# Influence over training steps",
        "",
        f"![influence by step](data:image/png;base64,{data})",
        "",
        f"Plot file: `{png}`",
        "",
        "| epoch | occurrences | total score | mean score per occurrence |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['epoch']} | {r['n']} | {r['total_score']:+.3e} | {r['mean_score']:+.3e} |" for r in per_epoch.to_dicts()
    ]
    return "\n".join(lines) + "\n"


def write_report(run: RunDir, timings: dict[str, float] | None = None) -> tuple[pl.DataFrame, Path, str]:
    """Write the plot and report.md into the run; returns (per-step table, plot path, summary markdown)."""
    per_step = influence_by_step(run)
    png = plot_influence(run, per_step)
    summary = summary_markdown(run, timings or {})
    with atomic_path(run.report) as tmp:
        tmp.write_text(summary + f"\n![influence by step](plots/{png.name})\n")
    return per_step, png, summary
