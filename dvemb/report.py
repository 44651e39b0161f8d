"""What a finished run shows: the influence-by-step plot, the top samples table and report.md.

The plot is normalised so that what it shows is the data, not the batching: an occurrence's score
is divided by its weight in the batch loss (``trajectory/batches.parquet``; 1/B for a mean loss), so
a short last batch of an epoch (weight 1/10 instead of 1/32) is not a spike. Its lower panel divides
further by the step's learning rate, on a log scale (the curve the phase detection reads).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import yaml
from matplotlib.figure import Figure

from dvemb.store.atomic import atomic_path
from dvemb.store.rundir import RunDir

TOP_N = 10
CURATION_DOC = Path(__file__).resolve().parents[1] / "docs" / "CURATION.md"
SYMLOG_RANGE = 30.0  # the signed panel switches to a symmetric log scale when max|y| / median|y| exceeds this


def plot_path(run: RunDir) -> Path:
    return run.root / "plots" / "influence_by_step.png"


def influence_by_step(run: RunDir) -> pl.DataFrame:
    """Per training step at the final checkpoint (one row per step with an occurrence).

    Columns: step, epoch, n (occurrences), total_score, mean_score, lr, batch_weight (mean weight of an
    occurrence), per_weight (mean of score / weight: batch size does not change it) and per_lr (mean of
    |score| / (weight * lr), > 0 unless every score of the step is 0).
    """
    occ = pl.read_parquet(run.occurrences)
    final = occ.filter(pl.col("checkpoint") == occ["checkpoint"].max())
    weights = pl.read_parquet(run.batches).group_by("step", "sample_id").agg(pl.col("weight").sum())
    lr = pl.read_parquet(run.steps, columns=["step", "lr"])
    scored = final.join(weights, on=["step", "sample_id"], how="left").join(lr, on="step", how="left")
    w = pl.col("weight").fill_null(1.0)
    return (
        scored.group_by("step", "epoch")
        .agg(
            n=pl.len(),
            total_score=pl.col("score").sum(),
            mean_score=pl.col("score").mean(),
            lr=pl.col("lr").first(),
            batch_weight=w.mean(),
            per_weight=(pl.col("score") / w).mean(),
            per_lr=(pl.col("score").abs() / (w * pl.col("lr"))).mean(),
        )
        .sort("step")
    )


def phases(run: RunDir) -> dict | None:
    """The early/middle/late phases recorded in curation/plan.json, if any."""
    return json.loads(run.plan.read_text()).get("phases") if run.plan.exists() else None


def phase_lines(ph: dict | None) -> list[str]:
    """One line per phase, its step range, or that it is empty (and what that means for its value column)."""
    if not ph:
        return ["- phases: not determined (the run has not been curated)"]
    spans = {
        "early": (0, ph["early_end"]),
        "middle": (ph["early_end"], ph["late_start"]),
        "late": (ph["late_start"], ph["total_steps"]),
    }
    how = "detected from the run" if ph.get("method") == "detected" else "set in the config"
    lines = []
    for name, (a, b) in spans.items():
        if b > a:
            lines.append(f"- {name} phase: steps [{a}, {b}) ({b - a} steps, {how})")
        else:
            col = f", so `value_{name}` is 0 for every sample" if name != "middle" else ""
            lines.append(f"- {name} phase: **empty** (none {how}{col})")
    return lines


def _shade_phases(ax, ph: dict | None) -> list[str]:
    """Shade the early/late phases on ``ax``; returns the names of the empty ones."""
    if not ph:
        return []
    empty = []
    if ph["early_end"] > 0:
        ax.axvspan(0, ph["early_end"], color="tab:green", alpha=0.12, label="early phase")
    else:
        empty.append("early")
    if ph["late_start"] < ph["total_steps"]:
        ax.axvspan(ph["late_start"], ph["total_steps"], color="tab:orange", alpha=0.12, label="late phase")
    else:
        empty.append("late")
    return empty


def plot_influence(run: RunDir, per_step: pl.DataFrame) -> Path:
    """PNG (RUN/plots/): per-weight score per step (signed) over per-LR |score| per step (log scale);
    segment boundaries dashed, phases shaded, empty phases named in the title."""
    fig = Figure(figsize=(8, 5.2), dpi=100)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    ph = phases(run)
    steps = per_step["step"].to_numpy()
    y = per_step["per_weight"].to_numpy()
    empty = _shade_phases(top, ph)
    _shade_phases(bottom, ph)
    top.plot(steps, y, lw=1.1, color="tab:blue", label="mean score / weight")
    top.axhline(0.0, color="black", lw=0.6)
    nz = np.abs(y[np.isfinite(y) & (y != 0)])
    if nz.size and nz.max() / np.median(nz) > SYMLOG_RANGE:
        top.set_yscale("symlog", linthresh=float(np.median(nz)))
        top.set_ylabel("score / weight (symlog)")
    else:
        top.set_ylabel("score / weight")
    lr_curve = per_step["per_lr"].to_numpy()
    pos = np.isfinite(lr_curve) & (lr_curve > 0)
    bottom.plot(steps[pos], lr_curve[pos], lw=1.0, color="tab:purple")
    if pos.any():
        bottom.set_yscale("log")
    bottom.set_ylabel("|score| / (weight · lr)")
    for ax in (top, bottom):
        for b in run.boundaries[1:-1]:
            ax.axvline(b, color="tab:gray", lw=0.8, ls="--")
    bottom.set_xlabel("training step (dashed: segment boundaries)")
    if top.get_legend_handles_labels()[0]:
        top.legend(loc="upper right", fontsize=8, frameon=False)
    note = f" — no {' / no '.join(empty)} phase detected" if empty else ""
    top.set_title(f"Influence of each step's batch on the final model (positive = helped){note}", fontsize=10)
    fig.tight_layout()
    path = plot_path(run)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def top_samples(run: RunDir, n: int = TOP_N, samples: Path | None = None) -> list[dict]:
    """The ``n`` most valuable and ``n`` most harmful training samples (rows for a table artifact), from the
    per-sample values ``samples`` (default: the run's own, scores/samples.parquet)."""
    samples = pl.read_parquet(samples or run.samples)
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


def drop_reason(policy: dict) -> str:
    """Why rows were dropped, in words, from the curate policy recorded in plan.json."""
    by = policy.get("filter_by", "value")
    drop = policy.get("drop", "negative")
    if drop == "negative":
        return f"drop=negative: {by} < 0, i.e. their steps raised the validation loss of the final model"
    if drop == "quantile":
        return f"drop=quantile: the lowest {policy.get('quantile', 0.0):.0%} of the samples by {by}"
    return "drop=none: nothing is filtered"


def curation_doc(run: RunDir) -> str:
    """docs/CURATION.md (the measured curation results) as a link that works from ``run``'s report.md."""
    doc, root = CURATION_DOC, run.root.resolve()
    if not doc.exists():
        return "`docs/CURATION.md` in the dvemb repository"
    inside = root.is_relative_to(doc.parents[1])  # a run in the checkout (runs/NAME): a relative link
    return f"[docs/CURATION.md]({Path(os.path.relpath(doc, root)).as_posix() if inside else doc.as_uri()})"


def retraining_lines(run: RunDir, plan: dict) -> list[str]:
    """What retraining on the curated table is expected to do: the measured results of docs/CURATION.md only."""
    if not plan["n_dropped"]:
        return []
    lines = [
        f"- **retraining on the curated table** (`dvemb.curate.retrain`, flow `retrain`; measured results: "
        f"{curation_doc(run)}): with label noise the value filter removes mostly flipped labels — on MNIST "
        "with 20 % of the labels flipped, dropping the negative-value samples (embedding-mode values, 5 seeds) "
        "lowered the clean test loss from 0.796 to 0.618 (random removal of as many rows: 0.897) at about "
        "the same test accuracy (0.848 vs 0.854)."
    ]
    if not run.corrupted.exists():
        lines.append(
            "- no label of this run was flipped on purpose, and docs/CURATION.md has no measurement on clean data: the "
            "dropped rows are those whose removal lowers the validation loss most (to first order), which need "
            "not carry over to new data — retrain on the curated table and compare on the test set before using it"
        )
    return lines


def curation_lines(run: RunDir, plan: dict) -> list[str]:
    """Kept / dropped and why; how the dropped rows were valued; flipped labels among them when known."""
    policy = plan.get("policy", {})
    by = policy.get("filter_by", "value")
    lines = [
        f"- kept **{plan['n_kept']}** of {plan['n_train']} training rows, dropped **{plan['n_dropped']}** "
        f"({drop_reason(policy)})",
        f"- the curated table is ordered by {plan['order']} → `{run.curated}`",
    ]
    samples = pl.read_parquet(run.samples)
    if by in samples.columns:
        v = samples[by]
        lines.append(f"- `{by}`: {(v > 0).sum()} samples helped, {(v < 0).sum()} hurt, {(v == 0).sum()} exactly 0")
    if plan["n_dropped"]:
        kept = pl.read_parquet(run.curated, columns=["sample_id"])
        dropped = pl.read_parquet(run.data("train"), columns=["sample_id"]).join(kept, on="sample_id", how="anti")
        if by in samples.columns:
            dv = dropped.join(samples.select("sample_id", by), on="sample_id", how="left")[by].drop_nulls()
            if dv.len():
                lines.append(f"- dropped rows' `{by}`: from {dv.min():+.3e} to {dv.max():+.3e}")
        if run.corrupted.exists():
            flipped = pl.read_parquet(run.corrupted, columns=["sample_id"])
            hit = dropped.join(flipped, on="sample_id", how="semi").height
            lines.append(
                f"- {hit} of the {dropped.height} dropped rows had their label flipped on purpose "
                f"({flipped.height} flipped in all)"
            )
    lines += retraining_lines(run, plan)
    windows = [w for w in plan.get("windows", []) if w.get("stop", 0) > w.get("start", 0)]
    if windows:
        spans = ", ".join(f"{w.get('mode', '?')} [{w['start']}, {w['stop']})" for w in windows)
        lines.append(f"- next run's batch plan: {spans}")
    return lines


def summary_markdown(
    run: RunDir, timings: dict[str, float], config_source: dict | None = None, config_yaml: str | None = None
) -> str:
    """Run summary: the config (file, overrides, resolved), steps, boundaries, phases, what curation
    kept and dropped and why, stage timings.

    ``config_source``: ``{"file": ..., "overrides": [...]}`` when the run came from a config file.
    ``config_yaml``: the resolved config as YAML (shown in full).
    """
    meta = run.meta()
    c = meta["config"]
    steps = pl.read_parquet(run.steps)
    plan = json.loads(run.plan.read_text()) if run.plan.exists() else {}
    d, m, t, cap = c["data"], c.get("model", {}), c["train"], c["capture"]
    task = c.get("task", m.get("kind", "mlp"))
    if task == "mlp":
        model = f"mlp hidden={m.get('hidden')} {m.get('activation')}"
    elif task == "gpt":
        model = f"gpt {m.get('n_layer')}L {m.get('n_head')}H {m.get('n_embd')}d"
    else:
        model = f"task {task}"
    noise_kind = d.get("label_noise_kind", "uniform")
    lines = [f"# dvemb run `{c['name']}`", "", f"Run directory: `{run.root}`", ""]
    if config_source:
        over = config_source.get("overrides") or []
        lines += [
            f"Config file: `{config_source['file']}`"
            + (f", overrides: {', '.join(f'`{o}`' for o in over)}" if over else ", no overrides"),
            "",
        ]
    lines += [
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
        *phase_lines(plan.get("phases")),
    ]
    if plan:
        lines += ["", "## Curation: kept and dropped", "", *curation_lines(run, plan)]
    if timings:
        lines += ["", "## Timings", "", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {stage} | {sec:.1f} |" for stage, sec in timings.items()]
        lines += [f"| **total** | **{sum(timings.values()):.1f}** |"]
    if config_yaml:
        lines += ["", "## Resolved config", "", "```yaml", config_yaml.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def plot_markdown(run: RunDir, per_step: pl.DataFrame, png: Path) -> str:
    """The plot inline (base64 PNG), its file path, and per-epoch totals."""
    data = base64.b64encode(png.read_bytes()).decode()
    per_epoch = (
        per_step.group_by("epoch")
        .agg(
            pl.col("total_score").sum(),
            pl.col("n").sum(),
            per_weight=(pl.col("per_weight") * pl.col("n")).sum() / pl.col("n").sum(),
        )
        .sort("epoch")
    )
    lines = [
        "# Influence over training steps",
        "",
        f"![influence by step](data:image/png;base64,{data})",
        "",
        "Upper panel: the mean over a step's occurrences of score / weight (the weight is the sample's share of",
        "the batch loss, so batch size does not make spikes). Lower panel: |score| / (weight · lr), log scale.",
        "",
        *phase_lines(phases(run)),
        "",
        f"Plot file: `{png}`",
        "",
        "| epoch | occurrences | total score | mean score / weight |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['epoch']} | {r['n']} | {r['total_score']:+.3e} | {r['per_weight']:+.3e} |" for r in per_epoch.to_dicts()
    ]
    return "\n".join(lines) + "\n"


def write_report(
    run: RunDir, timings: dict[str, float] | None = None, config_source: dict | None = None
) -> tuple[pl.DataFrame, Path, str]:
    """Write the plot and report.md into the run; returns (per-step table, plot path, summary markdown).

    ``timings``: wall seconds per stage, also recorded in run.json ``timings``."""
    if timings:
        run.update_meta(timings={k: round(v, 3) for k, v in timings.items()})  # the end summary reads them
    per_step = influence_by_step(run)
    png = plot_influence(run, per_step)
    resolved = yaml.safe_dump(run.meta()["config"], sort_keys=False, width=120)
    summary = summary_markdown(run, timings or {}, config_source, resolved)
    with atomic_path(run.report) as tmp:
        tmp.write_text(summary + f"\n![influence by step](plots/{png.name})\n")
    return per_step, png, summary
