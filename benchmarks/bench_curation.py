"""Curation benchmark on noisy MNIST (configs/mnist_noisy.yaml): mislabel detection, then retraining.

1. Train + embed + score the noisy run once (20 % of the training labels flipped on purpose), with the
   config's ``score.mode`` (``exact`` by default; ``--set score.mode=embedding`` for the embedding mode).
   The mode is recorded in the JSON (``score_mode``) and named in every table heading.
2. Detection of the flipped labels by lowest value: AUROC and precision at the true noise count,
   for DVEmb in the run's mode (scores/samples.parquet ``value``), DVEmb in the embedding mode on the
   same run (from its stored embeddings, when the run's mode is not ``embedding``), grad-dot
   (eta * <grad l_val(theta_T), g> summed over occurrences, the same projected gradients) and the plain
   training loss of the final model. The per-step influence curve (mean |score| of each step's
   occurrences at the final checkpoint) and the phases detected on it, for both modes.
   The ceiling of *any* validation-loss value: the exact all-epoch leave-one-out effect (fp64 retraining
   without the sample, ``dvemb.eval.groundtruth``) of ``--loo-samples`` random samples as a detector,
   next to the other detectors on the same samples. Then the same three detectors over ``--noise-seeds``
   source runs (data subset, flipped rows, model init) for each noise kind: uniform flips (the config)
   and pair flips (class c -> c + 1, Han et al. 2018), with the exact-LOO ceiling of the pair-flip run.
3. Retraining, ``--seeds`` seeds each (model init + batch order), evaluated on the clean test set:
   full data; random removal of as many rows as the DVEmb filter removes; the DVEmb filter;
   phase-aware online selection (early + late phases, within the config's select_budget); online
   selection at every step; the same two by prior value; the DVEmb filter combined with phase-aware
   online selection (what configs/mnist_noisy.yaml's curate section plans); the detected phases without
   the budget; online selection in fixed windows (first / middle / last third, last sixth, last half).
   Selection is stratified by label as the config says (curate.select_stratify).

    OMP_NUM_THREADS=1 python -m benchmarks.bench_curation            # ~20 min on 2 shared CPU cores
    python -m benchmarks.bench_curation --quick                       # smoke run
    python -m benchmarks.bench_curation --detect-only --loo-samples 0 --set train.epochs=20   # one setting

Writes benchmarks/results/bench_curation_<tag>.json (``_embedding`` in the tag when score.mode is not the
default) and prints the Markdown tables of docs/CURATION.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks.common import machine_info, replace_doc_block, source_run_path
from dvemb.config import RunConfig, load_config
from dvemb.curate.detect import detection_metrics, dvemb_values, grad_dot_values, loss_values
from dvemb.curate.plan import Window
from dvemb.curate.retrain import METRICS, Variant, fit_variant, summarize
from dvemb.curate.run import build_plan, curated_table
from dvemb.embed.recorded_state import adam_aware
from dvemb.embed.run import load_embeddings
from dvemb.eval.groundtruth import all_epoch_loo, choose_samples, load_trajectory, verify_replay
from dvemb.pipeline import run_local
from dvemb.replay.optim import ReplayError
from dvemb.score.run import val_vectors
from dvemb.score.scores import occurrence_table, segment_scores
from dvemb.score.state import state_occurrence_scores
from dvemb.score.values import phases_for, run_phases, smooth_curve, step_curve
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir
from dvemb.store.trajectory import read_steps

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist_noisy.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny subset, 1 seed: a smoke test")
    ap.add_argument("--run-dir", type=Path, default=None, help="keep the source run here (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="only print the tables of a finished run's JSON")
    ap.add_argument(
        "--doc-block", default=None, help="with --from-json: write them into this block of docs/CURATION.md"
    )
    ap.add_argument("--detect-only", action="store_true", help="source run + detection only (printed, not written)")
    ap.add_argument("--loo-samples", type=int, default=300, help="exact all-epoch LOO of this many samples (0: skip)")
    ap.add_argument("--noise-seeds", type=int, default=3, help="detection over this many runs per noise kind (0: skip)")
    ap.add_argument("--set", dest="sets", action="extend", nargs="+", default=[], help="overrides key.path=value")
    args = ap.parse_args()
    if args.from_json:
        print_markdown(args.from_json, args.doc_block)
        return
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    # the embedding-mode comparison reads the embeddings, which exact mode alone does not write
    sets = ["embed.write=always", *args.sets]
    if args.quick:
        sets += ["data.subset=600", "data.eval_subset=300", "train.epochs=2"]
    seeds = list(range(1 if args.quick else args.seeds))
    cfg = load_config(CONFIG, sets)
    mode = cfg.score.mode
    tag = ("quick_" if args.quick else "") + ("" if mode == "exact" else f"{mode}_") + "cpu"
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_curation_{tag}.json"
    with source_run_path(args.run_dir, "bench_curation_") as run_path:
        benchmark(args, cfg, seeds, out, run_path)


def benchmark(args: argparse.Namespace, cfg: RunConfig, seeds: list[int], out: Path, run_path: Path) -> None:
    """Source run, detection, retraining variants; the JSON and the tables."""
    t0 = time.perf_counter()

    # 1. the source run
    t = time.perf_counter()
    run = run_local(cfg, run_path, force=True, progress=False)
    source_s = time.perf_counter() - t
    corrupted = pl.read_parquet(run.corrupted)["sample_id"].to_numpy()
    mode = cfg.score.mode
    print(f"source run ({mode} scores): {source_s:.1f} s, {len(corrupted)} flipped labels")

    # 2. detection
    t = time.perf_counter()
    emb_occ = embedding_occurrences(run, cfg) if mode != "embedding" else None
    detectors = all_detectors(run, cfg, emb_occ)
    influence = influence_curves(run, cfg, emb_occ)
    detection = {name: detection_metrics(v, corrupted) for name, v in detectors.items()}
    by_column = detection_by_column(run, corrupted)
    detect_s = time.perf_counter() - t
    for name, m in detection.items():
        print(f"  {name:14s} AUROC {m['auroc']:.4f}  P@{m['k']} {m['precision_at_k']:.4f}")
    t = time.perf_counter()
    n_loo = 32 if args.quick else args.loo_samples
    loo_ceiling = exact_loo_detection(run, detectors, corrupted, n_loo)
    loo_s = time.perf_counter() - t
    if args.detect_only:  # printed, never recorded
        return
    t = time.perf_counter()
    n_noise = min(args.noise_seeds, 1) if args.quick else args.noise_seeds
    by_noise = {kind: detection_over_seeds(cfg, kind, n_noise, n_loo) for kind in ("uniform", "pairflip")}
    noise_s = time.perf_counter() - t

    # 3. retraining variants
    samples = pl.read_parquet(run.samples)
    train = pl.read_parquet(run.data("train"))
    phases = run_phases(run, cfg.curate)
    for m, c in influence.items():
        print(f"  {m} scores: early [0, {c['phases']['early_end']}), late [{c['phases']['late_start']}, {c['steps']})")
    filt_cfg = cfg.curate.model_copy(update={"select": "none", "reorder": "none"})
    filtered = curated_table(train, samples, filt_cfg)
    n_removed = train.height - filtered.height
    removed_noisy = int(np.isin(np.setdiff1d(train["sample_id"], filtered["sample_id"]), corrupted).sum())
    full = curated_table(train, samples, filt_cfg.model_copy(update={"drop": "none"}))
    sel_cfg = cfg.curate.model_copy(update={"drop": "none", "reorder": "none", "select": "online"})
    phase_plan = build_plan(phases, sel_cfg, train.height, train.height, str(run.root))
    prior_plan = build_plan(phases, sel_cfg.model_copy(update={"select": "prior"}), train.height, train.height)
    every_plan = window_plan(phase_plan, 0, phases.total_steps)
    every_prior_plan = window_plan(prior_plan, 0, phases.total_steps, "prior")
    unbudgeted = sel_cfg.model_copy(update={"select_budget": None})
    wide_plan = build_plan(phases, unbudgeted, train.height, train.height)
    wide_prior_plan = build_plan(phases, unbudgeted.model_copy(update={"select": "prior"}), train.height, train.height)
    print(f"phases: early [0, {phases.early_end}), late [{phases.late_start}, {phases.total_steps})")
    budget = f", budget {cfg.curate.select_budget:.2f}" if cfg.curate.select_budget is not None else ""
    print(f"filter removes {n_removed} rows ({removed_noisy} of them flipped)")

    rows = []
    t = time.perf_counter()
    for seed in seeds:
        rng = np.random.default_rng([seed, 0xD0])
        random_keep = train.sample(n=filtered.height, seed=int(rng.integers(2**31)), shuffle=False)
        variants = [
            Variant("full data", train.to_arrow()),
            Variant(f"random removal (-{n_removed})", random_keep.to_arrow()),
            Variant(f"DVEmb filter (-{n_removed})", filtered.to_arrow()),
            Variant(f"phase-aware online selection (early + late{budget})", full.to_arrow(), phase_plan),
            Variant("online selection at every step", full.to_arrow(), every_plan),
            Variant(f"phase-aware prior-value selection (early + late{budget})", full.to_arrow(), prior_plan),
            Variant("prior-value selection at every step", full.to_arrow(), every_prior_plan),
            Variant("DVEmb filter + phase-aware online selection", filtered.to_arrow(), phase_plan),
        ]
        if cfg.curate.select_budget is not None:  # the detected phases in full
            variants += [
                Variant("phase-aware online selection (detected phases, no budget)", full.to_arrow(), wide_plan),
                Variant("phase-aware prior-value selection (no budget)", full.to_arrow(), wide_prior_plan),
            ]
        # where does selection pay off? online selection in one fixed window of the source run's steps
        T = phases.total_steps
        windows = {
            "first third": (0, T // 3),
            "middle third": (T // 3, 2 * T // 3),
            "last sixth": (T - T // 6, T),
            "last third": (T - T // 3, T),
            "last half": (T - T // 2, T),
        }
        variants += [
            Variant(f"online selection, {name} of the steps", full.to_arrow(), window_plan(phase_plan, a, b))
            for name, (a, b) in windows.items()
        ]
        for v in variants:
            r = fit_variant(run, cfg, v, seed)
            rows.append(r)
            print(
                f"  seed {seed} {v.name:50s} test acc {r['test_acc']:.4f} "
                f"loss {r['test_loss']:.4f} ({r['seconds']:.1f} s)"
            )
    retrain_s = time.perf_counter() - t
    summary = summarize(rows)
    total_s = time.perf_counter() - t0

    result = {
        "benchmark": "bench_curation",
        "machine": machine_info("cpu"),
        "config": cfg.model_dump(mode="json"),
        "score_mode": mode,
        "n_train": train.height,
        "n_flipped": int(len(corrupted)),
        "phases": phases.model_dump(mode="json"),
        "influence_curve": influence,
        "filter": {"policy": cfg.curate.drop, "n_removed": n_removed, "n_removed_flipped": removed_noisy},
        "detection": detection,
        "detection_by_column": by_column,
        "loo_ceiling": loo_ceiling,
        "detection_by_noise": by_noise,
        "seeds": seeds,
        "retrain_runs": rows,
        "retrain_summary": summary.to_dicts(),
        "seconds": {
            "source_run": source_s,
            "detection": detect_s,
            "exact_loo": loo_s,
            "noise_kinds": noise_s,
            "retraining": retrain_s,
            "total": total_s,
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out} ({total_s:.0f} s)\n")
    print(markdown(result, summary))


def all_detectors(run: RunDir, cfg: RunConfig, emb_occ: pl.DataFrame | None) -> dict[str, pl.DataFrame]:
    """DVEmb (the run's score mode; the embedding mode from ``emb_occ`` too), grad-dot and training-loss
    values of a finished run (low = flagged)."""
    out = {f"DVEmb ({cfg.score.mode})": dvemb_values(run)}
    if emb_occ is not None:
        out["DVEmb (embedding)"] = (
            emb_occ.group_by("sample_id").agg(pl.col("score").sum().alias("value")).sort("sample_id")
        )
    return out | {"grad-dot": grad_dot_values(run, cfg), "training loss": loss_values(run, cfg)}


def embedding_occurrences(run: RunDir, cfg: RunConfig) -> pl.DataFrame:
    """Embedding-mode scores of every occurrence at the final checkpoint (sample_id, step, score), as
    ``score.mode: embedding`` would write them, without touching the run's scores/ (AdamW: the Adam-aware
    direct recursion, which gives that mode's numbers without writing embeddings)."""
    b = run.boundaries
    k = len(b) - 1
    if adam_aware(run):
        records = [r for j in range(k) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
        return occurrence_table(records, state_occurrence_scores(run, cfg, b[k], val_vectors(run, cfg, b[k])))
    local, props = load_embeddings(run, cfg.embed.device)
    s = segment_scores(local, props, val_vectors(run, cfg, b[k]), upto=k)
    return occurrence_table([e for seg in local for e in seg], s)


def influence_curves(run: RunDir, cfg: RunConfig, emb_occ: pl.DataFrame | None) -> dict[str, dict]:
    """Per score mode: the per-step influence curve the phases are detected on (mean |score| of each step's
    occurrences at the final checkpoint, / LR when ``curate.phase_curve`` is per_lr), its smoothed form, and
    the phases detected on it (the configured ones when ``curate.phases`` is set)."""
    c = cfg.curate
    T = run.boundaries[-1]
    lr = read_steps(run)["lr"].to_numpy() if c.phase_curve == "per_lr" else None
    occs = {cfg.score.mode: pl.read_parquet(run.occurrences)}
    if emb_occ is not None:
        occs["embedding"] = emb_occ
    out = {}
    for mode, occ in occs.items():
        curve = step_curve(occ, T, lr)
        out[mode] = {
            "steps": T,
            "curve": c.phase_curve,
            "mean_abs_score": curve.tolist(),
            "smoothed": smooth_curve(curve, c.phase_smooth or max(1, round(T / 20))).tolist(),
            "phases": phases_for(occ, T, c.phases, c.phase_threshold, c.phase_smooth, lr).model_dump(mode="json"),
        }
    return out


def detection_by_column(run, corrupted: np.ndarray) -> dict[str, float]:
    """AUROC of every value column of scores/samples.parquet (per epoch, phase, checkpoint) — *when*
    the flipped labels are visible. Reported, never used to pick a detector."""
    samples = pl.read_parquet(run.samples)
    return {
        c: detection_metrics(samples.select("sample_id", pl.col(c).alias("value")), corrupted)["auroc"]
        for c in samples.columns
        if c.startswith("value") and samples[c].n_unique() > 1
    }


def detection_over_seeds(cfg: RunConfig, kind: str, n_seeds: int, n_loo: int) -> dict | None:
    """Detection by all detectors over ``n_seeds`` source runs with ``kind`` label noise; seed s sets the
    data subset, the flipped rows and the model init. The exact-LOO ceiling (``n_loo`` samples) of the
    seed-0 pair-flip run. None when ``n_seeds`` is 0.

    A run that exact mode cannot score (ReplayError: its replay misses a recorded boundary) is kept as
    ``{"seed", "error"}`` and left out of the summary (every detector is summarised over the same runs).
    """
    if n_seeds <= 0:
        return None
    per_seed = []
    for seed in range(n_seeds):
        update = {"label_noise_kind": kind, "seed": seed}
        c = cfg.model_copy(
            update={
                "data": cfg.data.model_copy(update=update),
                "model": cfg.model.model_copy(update={"seed": seed}),
            }
        )
        with source_run_path(None, f"bench_curation_{kind}{seed}_") as path:
            try:
                run = run_local(c, path, force=True, progress=False)
            except ReplayError as e:
                per_seed.append({"seed": seed, "error": str(e)})
                print(f"  {kind} seed {seed}: no scores ({e})")
                continue
            corrupted = pl.read_parquet(run.corrupted)["sample_id"].to_numpy()
            emb_occ = embedding_occurrences(run, c) if c.score.mode != "embedding" else None
            detectors = all_detectors(run, c, emb_occ)
            row = {"seed": seed, "detection": {n: detection_metrics(v, corrupted) for n, v in detectors.items()}}
            row["phases"] = {m: v["phases"] for m, v in influence_curves(run, c, emb_occ).items()}
            if kind == "pairflip" and seed == 0:
                row["loo_ceiling"] = exact_loo_detection(run, detectors, corrupted, n_loo)
        per_seed.append(row)
        print(f"  {kind} seed {seed}: " + ", ".join(f"{n} {m['auroc']:.4f}" for n, m in row["detection"].items()))
    done = [r for r in per_seed if "detection" in r]
    summary = {}
    for name in done[0]["detection"] if done else []:
        for metric in ("auroc", "precision_at_k"):
            x = np.array([r["detection"][name][metric] for r in done])
            summary.setdefault(name, {}).update(
                {
                    f"{metric}_mean": float(x.mean()),
                    f"{metric}_sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                }
            )
    return {"per_seed": per_seed, "summary": summary}


def window_plan(plan, start: int, stop: int, mode: str = "online"):
    """``plan`` with ``mode`` selection in [start, stop) only (source-run steps), uniform elsewhere."""
    return plan.model_copy(update={"windows": [Window(start=start, stop=stop, mode=mode, phase="window")]})


def exact_loo_detection(run: RunDir, detectors: dict[str, pl.DataFrame], corrupted: np.ndarray, n: int) -> dict | None:
    """AUROC of the exact all-epoch LOO effect (l_val' - l_val, negated: low = harmful) of ``n`` random
    samples, and of every detector restricted to the same samples. None when ``n`` is 0."""
    if n <= 0:
        return None
    traj = load_trajectory(run, fp64=True)
    ids = choose_samples(traj, n, seed=0)
    loo = all_epoch_loo(traj, ids, chunk=128).numpy()
    # a sample whose removal raises the validation loss helped: its value is +loo
    tables = {"exact all-epoch LOO": pl.DataFrame({"sample_id": ids, "value": loo})}
    tables |= {name: v.filter(pl.col("sample_id").is_in(ids)) for name, v in detectors.items()}
    out = {
        "n_samples": len(ids),
        "n_flipped": int(np.isin(ids, corrupted).sum()),
        "replay_rel_error": verify_replay(traj),
    }
    out["detection"] = {name: detection_metrics(v, corrupted) for name, v in tables.items()}
    for name, m in out["detection"].items():
        print(f"  on {len(ids)} samples: {name:20s} AUROC {m['auroc']:.4f}")
    return out


def score_mode(result: dict) -> str:
    """The score mode a benchmark JSON's source runs were scored with (older JSONs: from their config)."""
    return result.get("score_mode") or result["config"]["score"]["mode"]


def detector_name(name: str, mode: str) -> str:
    """Older JSONs call the run's own values plain "DVEmb": name their mode."""
    return f"DVEmb ({mode})" if name == "DVEmb" else name


def markdown(result: dict, summary: pl.DataFrame) -> str:
    mode = score_mode(result)
    lines = [
        f"Mislabel detection ({result['n_flipped']} of {result['n_train']} labels flipped; source run scored in "
        f"{mode} mode):",
        "",
        "| detector (lowest value = flagged) | AUROC | precision at k = #flipped |",
        "|---|---:|---:|",
    ]
    for name, m in result["detection"].items():
        lines.append(f"| {detector_name(name, mode)} | {m['auroc']:.4f} | {m['precision_at_k']:.4f} |")
    ceil = result.get("loo_ceiling")
    if ceil:
        lines += [
            "",
            f"The same detectors on {ceil['n_samples']} random samples ({ceil['n_flipped']} flipped), next to the "
            "exact all-epoch leave-one-out effect on the validation loss (fp64 retraining without each sample):",
            "",
            "| detector (same samples) | AUROC | precision at k = #flipped |",
            "|---|---:|---:|",
        ]
        for name, m in ceil["detection"].items():
            lines.append(f"| {detector_name(name, mode)} | {m['auroc']:.4f} | {m['precision_at_k']:.4f} |")
    if result.get("detection_by_column"):
        cols = ", ".join(f"`{c}` {a:.3f}" for c, a in result["detection_by_column"].items())
        lines += ["", f"AUROC of each value column of `scores/samples.parquet` ({mode} mode): {cols}."]
    lines += influence_markdown(result.get("influence_curve") or {}, result["phases"], mode)
    lines += noise_kind_markdown(result.get("detection_by_noise") or {}, mode)
    lines += [
        "",
        f"Retraining on the {mode}-mode values (filter, prior value, detected phases), mean ± sd over "
        f"{len(result['seeds'])} seeds (clean test set):",
        "",
        "| variant | train rows | selection steps | test accuracy | test loss | share of the every-step "
        "test-loss gain (same selection mode) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    by_name = {r["variant"]: r for r in summary.to_dicts()}
    full = by_name.get("full data")

    def share(r: dict) -> str:
        """Test-loss gain over full data as a share of every-step selection's (prior rows: prior every step)."""
        prior = "prior-value" in r["variant"] and "prior-value selection at every step" in by_name
        every = by_name.get("prior-value selection at every step" if prior else "online selection at every step")
        if not full or not every or every["test_loss_mean"] == full["test_loss_mean"]:
            return "—"
        return (
            f"{(full['test_loss_mean'] - r['test_loss_mean']) / (full['test_loss_mean'] - every['test_loss_mean']):.2f}"
        )

    for r in summary.to_dicts():
        lines.append(
            f"| {r['variant']} | {r['n_train']} | {r['selection_steps']} | "
            f"{r['test_acc_mean']:.4f} ± {r['test_acc_sd']:.4f} | "
            f"{r['test_loss_mean']:.4f} ± {r['test_loss_sd']:.4f} | "
            f"{share(r)} |"
        )
    assert set(METRICS) <= {c.rsplit("_", 1)[0] for c in summary.columns if c.endswith("_mean")}
    return "\n".join(lines)


def influence_markdown(curves: dict, phases: dict, mode: str, bins: int = 10) -> list[str]:
    """The per-step influence curve of each score mode by tenth of the run, and the phases detected on it."""
    if not curves:
        return []
    T = phases["total_steps"]
    edges = np.linspace(0, T, bins + 1).round().astype(int)
    what = "mean |score| / LR" if next(iter(curves.values()))["curve"] == "per_lr" else "mean |score|"
    lines = [
        "",
        f"Per-step influence curve ({what} of each step's occurrences at the final checkpoint, step {T}) by "
        f"tenth of the run, and the phases detected on it (selection uses the {mode}-mode ones):",
        "",
        "| steps | " + " | ".join(f"{m} mode" for m in curves) + " |",
        "|---|" + "---:|" * len(curves),
    ]
    for a, b in zip(edges[:-1], edges[1:]):
        vals = " | ".join(f"{np.mean(c['mean_abs_score'][a:b]):.3e}" for c in curves.values())
        lines.append(f"| {a}–{b - 1} | {vals} |")
    lines.append("| **detected phases** | " + " | ".join(phase_text(c["phases"]) for c in curves.values()) + " |")
    return lines


def phase_text(p: dict) -> str:
    """``early [0, e) + late [l, T)`` with an empty phase named as such."""
    early = f"early [0, {p['early_end']})" if p["early_end"] > 0 else "early ∅"
    late = f"late [{p['late_start']}, {p['total_steps']})" if p["late_start"] < p["total_steps"] else "late ∅"
    return f"{early}, {late}"


def noise_kind_markdown(by_noise: dict, mode: str) -> list[str]:
    """Detection per noise kind, mean ± sd over the source-run seeds; the phases each run's modes detect;
    the pair-flip exact-LOO ceiling."""
    kinds = {k: v for k, v in by_noise.items() if v}
    if not kinds:
        return []
    done = {k: [r for r in v["per_seed"] if "detection" in r] for k, v in kinds.items()}
    n = {len(r) for r in done.values()}
    n = "/".join(map(str, n)) if len(n) == 1 else " / ".join(f"{len(r)} ({k})" for k, r in done.items())
    lines = [
        "",
        f"Detection by noise kind, mean ± sd over {n} source runs (seed = data "
        f"subset, flipped rows and model init; source runs scored in {mode} mode):",
        "",
        "| noise | detector | AUROC | precision at k | AUROC per seed |",
        "|---|---|---:|---:|---|",
    ]
    for kind, v in kinds.items():
        for name, m in v["summary"].items():
            seeds = ", ".join(
                f"{r['detection'][name]['auroc']:.3f}" if "detection" in r else "—" for r in v["per_seed"]
            )
            lines.append(
                f"| {kind} | {detector_name(name, mode)} | {m['auroc_mean']:.4f} ± {m['auroc_sd']:.4f} | "
                f"{m['precision_at_k_mean']:.4f} ± {m['precision_at_k_sd']:.4f} | {seeds} |"
            )
    failed = [(k, r) for k, v in kinds.items() for r in v["per_seed"] if "error" in r]
    if failed:
        lines += [""] + [f"{k} seed {r['seed']}: not scored, left out of the means — {r['error']}" for k, r in failed]
    if all("phases" in r for rows in done.values() for r in rows) and any(done.values()):
        lines += ["", "Phases detected on each of these source runs:", ""]
        modes = list(next(r for rows in done.values() for r in rows)["phases"])
        head = "| noise | seed | " + " | ".join(f"{m} mode" for m in modes) + " |"
        lines += [head, "|---|---:|" + "---|" * len(modes)]
        lines += [
            f"| {kind} | {r['seed']} | " + " | ".join(phase_text(r["phases"][m]) for m in modes) + " |"
            for kind, rows in done.items()
            for r in rows
        ]
    ceil = (kinds.get("pairflip") or {"per_seed": [{}]})["per_seed"][0].get("loo_ceiling")
    if ceil:
        lines += ["", f"Pair flips, seed 0, on {ceil['n_samples']} random samples ({ceil['n_flipped']} flipped):", ""]
        lines += ["| detector (same samples) | AUROC | precision at k = #flipped |", "|---|---:|---:|"]
        lines += [
            f"| {detector_name(name, mode)} | {m['auroc']:.4f} | {m['precision_at_k']:.4f} |"
            for name, m in ceil["detection"].items()
        ]
    return lines


def print_markdown(path: Path, doc_block: str | None = None) -> None:
    """The Markdown tables of a finished benchmark's JSON; also into ``doc_block`` of docs/CURATION.md."""
    result = json.loads(path.read_text())
    text = markdown(result, pl.DataFrame(result["retrain_summary"]))
    print(text)
    if doc_block:
        cfg, m, sec = result["config"], result["machine"], result["seconds"]
        head = (
            f"Tables of `{path}` (`--from-json {path} --doc-block {doc_block}`): score.mode "
            f"**{score_mode(result)}**, {cfg['train']['epochs']} epochs, lr {cfg['train']['lr']}, "
            f"{result['phases']['total_steps']} steps, "
            f"{len(result['seeds'])} seeds; measured {m['date']} on {m['cpu_model']}, {sec['total']:.0f} s.\n\n"
        )
        replace_doc_block(ROOT / "docs" / "CURATION.md", doc_block, head + text)


if __name__ == "__main__":
    main()
