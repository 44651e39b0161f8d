"""Phase analysis on the Shakespeare GPT (configs/shakespeare_gpt.yaml: warm-up 20 + cosine to 0).

1. Source run (train + embed + score + curate) -> scores/occurrences.parquet; the per-step influence
   curve at the final checkpoint (mean |score|, mean score, and mean |score| / eta_t) with the LR
   schedule; phases detected by ``dvemb.score.values.detect_phases`` on the raw curve (what the
   curate stage does) and on the LR-normalised curve; plot -> docs/img/shakespeare_influence_by_step.png.
2. Retraining on the same 2 000 training blocks, same model config, from seeds 0, 1, ...:
   uniform batches vs phase-aware online selection (early + late phases only) vs online selection at
   every step (pool ``--pool-factor`` x B, gradient alignment with the validation gradient). There is
   no test split, so the 256 validation blocks are split in half (seeded): the selector only sees the
   "select" half; ``heldout_loss`` is on the other half, ``val_loss`` on all 256.

    OMP_NUM_THREADS=1 python -m benchmarks.bench_phases_gpt                  # ~20 min on 1 CPU core
    OMP_NUM_THREADS=1 python -m benchmarks.bench_phases_gpt --run-dir runs/shk --reuse   # reuse step 1's run
    python -m benchmarks.bench_phases_gpt --quick                            # smoke run (tiny subset)

Writes benchmarks/results/bench_phases_gpt_<tag>.json (after every fit, so a cut run keeps what it
finished) and prints the Markdown table of docs/CURATION.md.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import machine_info, source_run_path, write_json_atomic
from dvemb.config import RunConfig, load_config
from dvemb.curate.plan import SelectionPlan, Window
from dvemb.curate.retrain import Variant, fit_variant, summarize
from dvemb.pipeline import run_local
from dvemb.score.values import Phases, detect_phases, final_occurrences, smooth_curve, step_curve
from dvemb.store.rundir import RunDir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare_gpt.yaml"
PLOT = ROOT / "docs" / "img" / "shakespeare_influence_by_step.png"


def influence_curves(run: RunDir) -> dict[str, np.ndarray]:
    """Per-step curves at the final checkpoint: mean |score|, mean score, n, lr, mean |score| / lr."""
    occ = pl.read_parquet(run.occurrences)
    steps = pl.read_parquet(run.root / "trajectory" / "steps.parquet").sort("step")
    total = steps.height
    lr = steps["lr"].to_numpy().astype(np.float64)
    abs_mean = step_curve(occ, total)
    per = final_occurrences(occ).group_by("step").agg(pl.col("score").mean().alias("m"), pl.len().alias("n"))
    mean = np.zeros(total)
    n = np.zeros(total, dtype=np.int64)
    mean[per["step"].to_numpy()] = per["m"].to_numpy()
    n[per["step"].to_numpy()] = per["n"].to_numpy()
    return {
        "step": np.arange(total),
        "lr": lr,
        "mean_abs_score": abs_mean,
        "mean_score": mean,
        "n": n,
        "mean_abs_score_per_lr": np.where(lr > 0, abs_mean / np.maximum(lr, 1e-30), 0.0),
        "train_loss": steps["loss"].to_numpy().astype(np.float64),
    }


def phase_dict(curve: np.ndarray, threshold: float, smooth: int | None) -> dict:
    early_end, late_start = detect_phases(curve, threshold, smooth)
    total = len(curve)
    return {
        "early": [0, early_end],
        "middle": [early_end, late_start],
        "late": [late_start, total],
        "early_end": early_end,
        "late_start": late_start,
        "selection_steps_early_late": early_end + total - late_start,
    }


def plot(curves: dict[str, np.ndarray], raw: dict, normed: dict, smooth: int, path: Path) -> None:
    from matplotlib.figure import Figure

    t, lr = curves["step"], curves["lr"]
    fig = Figure(figsize=(9, 8.5), layout="constrained")
    axes = fig.subplots(3, 1, sharex=True)
    panels = [
        ("mean |score| per step (final checkpoint)", curves["mean_abs_score"], True, raw, "raw-curve phases"),
        ("mean score per step (signed; + = helped)", curves["mean_score"], False, None, None),
        ("mean |score| / η_t (LR-normalised)", curves["mean_abs_score_per_lr"], True, normed, "LR-normalised phases"),
    ]
    for ax, (title, y, log, ph, label) in zip(axes, panels, strict=True):
        ax.plot(t, y, color="0.65", lw=0.8, label="per step")
        ax.plot(t, smooth_curve(y, smooth), color="C0", lw=2, label=f"smoothed ({smooth} steps)")
        if log:
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="k", lw=0.6)
        if ph is not None:
            for name, color in (("early", "C2"), ("late", "C3")):
                a, b = ph[name]
                if b > a:
                    ax.axvspan(a, b, color=color, alpha=0.12, label=f"{label}: {name} [{a}, {b})")
        ax.set_title(title, fontsize=10)
        twin = ax.twinx()
        twin.plot(t, lr, color="C1", lw=1.2, ls="--", label="learning rate")
        twin.set_ylabel("lr", color="C1")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", ncol=2)
    axes[-1].set_xlabel("training step")
    fig.suptitle("Shakespeare GPT (warm-up 20 + cosine): per-step influence at the final checkpoint", fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def split_val(val: pa.Table, seed: int = 0) -> tuple[pa.Table, pa.Table]:
    """(select half, held-out half) of the validation table, seeded, each in table order."""
    perm = np.random.default_rng([seed, 0x4E1D]).permutation(val.num_rows)
    half = val.num_rows // 2
    return val.take(pa.array(np.sort(perm[:half]))), val.take(pa.array(np.sort(perm[half:])))


def selection_plan(total: int, windows: list[tuple[int, int, str]], pool_factor: int, val_every: int, val_samples: int):
    return SelectionPlan(
        source_total_steps=total,
        phases=None,
        windows=[Window(start=a, stop=b, mode="online", phase=p) for a, b, p in windows if b > a],
        pool_factor=pool_factor,
        val_every=val_every,
        val_samples=val_samples,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=2, help="seeds of the uniform baseline")
    ap.add_argument("--select-seeds", type=int, default=1, help="seeds of each selection variant")
    ap.add_argument("--pool-factor", type=int, default=2, help="candidate pool = m x B")
    ap.add_argument("--val-every", type=int, default=10, help="refresh the validation gradient every n selections")
    ap.add_argument("--val-samples", type=int, default=32, help="validation rows in the selector's gradient")
    ap.add_argument("--run-dir", type=Path, default=None, help="source run directory (default: a temp dir)")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished source run in --run-dir")
    ap.add_argument("--quick", action="store_true", help="tiny subset, 1 seed: a smoke test")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sets = ["data.subset=160", "data.eval_subset=32"] if args.quick else []
    cfg = load_config(CONFIG, sets)
    tag = "quick_cpu" if args.quick else "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_phases_gpt_{tag}.json"
    with source_run_path(args.run_dir, "bench_phases_gpt_") as run_path:
        benchmark(args, cfg, out, run_path)


def benchmark(args: argparse.Namespace, cfg: RunConfig, out: Path, run_path: Path) -> None:
    """Source run, influence curve and phases, retraining; the JSON and the table."""
    t0 = time.perf_counter()

    # 1. source run + influence curve + phases
    source_s = None
    if args.reuse and (run_path / "curation" / "plan.json").exists():
        run = RunDir(run_path)
        print(f"reusing source run {run_path}")
    else:
        t = time.perf_counter()
        run = run_local(cfg, run_path, force=True, progress=False)
        source_s = time.perf_counter() - t
        print(f"source run: {source_s:.1f} s")
    curves = influence_curves(run)
    total = len(curves["step"])
    smooth = cfg.curate.phase_smooth or max(1, round(total / 20))
    thr = cfg.curate.phase_threshold
    raw = phase_dict(curves["mean_abs_score"], thr, cfg.curate.phase_smooth)
    normed = phase_dict(curves["mean_abs_score_per_lr"], thr, cfg.curate.phase_smooth)
    sweep = {
        str(th): {
            "raw": list(detect_phases(curves["mean_abs_score"], th, cfg.curate.phase_smooth)),
            "lr_normalised": list(detect_phases(curves["mean_abs_score_per_lr"], th, cfg.curate.phase_smooth)),
        }
        for th in (0.3, 0.5, 0.7)
    }
    warm = cfg.train.warmup_steps
    seg = {
        "warmup": [0, warm],
        **{f"q{i}": [warm + i * (total - warm) // 4, warm + (i + 1) * (total - warm) // 4] for i in range(4)},
    }
    by_segment = {
        k: {
            "mean_abs_score": float(curves["mean_abs_score"][a:b].mean()),
            "mean_score": float(curves["mean_score"][a:b].mean()),
            "mean_abs_score_per_lr": float(curves["mean_abs_score_per_lr"][a:b].mean()),
            "mean_lr": float(curves["lr"][a:b].mean()),
        }
        for k, (a, b) in seg.items()
    }
    print(f"phases (raw curve, dvemb.score.values): early [0, {raw['early_end']}), late [{raw['late_start']}, {total})")
    print(f"phases (LR-normalised curve): early [0, {normed['early_end']}), late [{normed['late_start']}, {total})")
    if not args.no_plot:
        plot(curves, raw, normed, smooth, PLOT)
        print(f"plot -> {PLOT}")

    # 2. retraining: uniform vs phase-aware online selection vs online selection at every step
    val_sel, heldout = split_val(pq.read_table(run.data("val")))
    evals = {"val": run.data("val"), "heldout": heldout}
    plans = {
        "uniform": None,
        "phase-aware online (early + late, LR-normalised phases)": selection_plan(
            total,
            [(0, normed["early_end"], "early"), (normed["late_start"], total, "late")],
            args.pool_factor,
            args.val_every,
            args.val_samples,
        ),
        # the same phases held to a third of the steps: the early phase + the last stretch that fills the budget
        "phase-aware online, 1/3 of the steps (early + last stretch)": selection_plan(
            total,
            [
                (0, min(normed["early_end"], total // 3), "early"),
                (total - max(0, total // 3 - normed["early_end"]), total, "late"),
            ],
            args.pool_factor,
            args.val_every,
            args.val_samples,
        ),
        "online at every step": selection_plan(
            total, [(0, total, "all")], args.pool_factor, args.val_every, args.val_samples
        ),
    }
    train = run.data("train")
    result = {
        "benchmark": "bench_phases_gpt",
        "machine": machine_info("cpu"),
        "config": cfg.model_dump(mode="json"),
        "total_steps": total,
        "phase_threshold": thr,
        "phase_smooth": smooth,
        "phases_raw": raw,
        "phases_raw_model": Phases(
            total_steps=total, early_end=raw["early_end"], late_start=raw["late_start"], threshold=thr
        ).model_dump(mode="json"),
        "phases_lr_normalised": normed,
        "phases_threshold_sweep": sweep,
        "curve_by_segment": by_segment,
        "corr_abs_score_lr": float(np.corrcoef(curves["mean_abs_score"], curves["lr"])[0, 1]),
        "curves": {k: v.tolist() for k, v in curves.items()},
        "plot": str(PLOT.relative_to(ROOT)),
        "retrain": {
            "pool_factor": args.pool_factor,
            "val_every": args.val_every,
            "val_samples": args.val_samples,
            "select_val_rows": val_sel.num_rows,
            "heldout_rows": heldout.num_rows,
            "plans": {k: (None if p is None else p.model_dump(mode="json")) for k, p in plans.items()},
        },
        "retrain_runs": [],
        "seconds": {"source_run": source_s},
    }
    n_seeds = 1 if args.quick else args.seeds
    n_select = 1 if args.quick else args.select_seeds
    rows = result["retrain_runs"]
    t = time.perf_counter()
    for seed in range(max(n_seeds, n_select)):
        for name, plan in plans.items():
            if seed >= (n_seeds if plan is None else n_select):
                continue
            r = fit_variant(run, cfg, Variant(name, train, plan), seed, select_val=val_sel, eval_tables=evals)
            rows.append(r)
            print(
                f"  seed {seed} {name:56s} val {r['val_loss']:.4f} heldout {r['heldout_loss']:.4f} "
                f"({r['selection_steps']} sel. steps, {r['seconds']:.0f} s)",
                flush=True,
            )
            result["retrain_summary"] = summarize(rows).to_dicts()
            result["seconds"]["retraining"] = time.perf_counter() - t
            write_json_atomic(out, result)
    result["seconds"]["total"] = time.perf_counter() - t0
    write_json_atomic(out, result)
    print(f"\nwrote {out} ({result['seconds']['total']:.0f} s)\n")
    print(markdown(result))


def markdown(result: dict) -> str:
    """The table of docs/CURATION.md: mean ± sd over seeds (sd only with >= 2 seeds) and the paired
    difference from the uniform fit of the same seed (mean over the seeds both have)."""
    runs = result["retrain_runs"]
    base = {r["seed"]: r for r in runs if r["selection_steps"] == 0}

    def cell(r: dict, m: str) -> str:
        sd = f" ± {r[f'{m}_sd']:.4f}" if r["seeds"] > 1 else ""
        return f"{r[f'{m}_mean']:.4f}{sd}"

    def paired(variant: str, m: str) -> str:
        rows = [r for r in runs if r["variant"] == variant and r["seed"] in base and r["selection_steps"] > 0]
        return f"{np.mean([r[m] - base[r['seed']][m] for r in rows]):+.4f}" if rows else "—"

    lines = [
        "| variant | seeds | selection steps | val loss (256) | held-out loss (128) | Δ held-out vs uniform, same seed "
        "| held-out token acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["retrain_summary"]:
        lines.append(
            f"| {r['variant']} | {r['seeds']} | {r['selection_steps']} | {cell(r, 'val_loss')} | "
            f"{cell(r, 'heldout_loss')} | {paired(r['variant'], 'heldout_loss')} | {cell(r, 'heldout_acc')} |"
        )
    lines += [
        "",
        "| variant | seed | val loss | held-out loss | held-out token acc | seconds |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['val_loss']:.4f} | {r['heldout_loss']:.4f} | "
            f"{r['heldout_acc']:.4f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
