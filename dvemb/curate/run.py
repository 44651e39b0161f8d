"""Stage ``curate``: the next run's training table and its plan, from the per-sample values."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from dvemb.config import CurateConfig, RunConfig
from dvemb.curate.filter import by_value, keep_ids
from dvemb.curate.plan import SelectionPlan, plan_windows
from dvemb.score.values import Phases, run_phases
from dvemb.store.atomic import atomic_path, write_json
from dvemb.store.rundir import RunDir


def curated_table(train: pl.DataFrame, samples: pl.DataFrame, policy: CurateConfig) -> pl.DataFrame:
    """The kept training rows, most valuable first, with a ``prior_value`` column (``policy.select_value``).

    Rows of ``train`` missing from ``samples`` (never scored) get prior value 0 and are kept unless
    filtered by ``drop=negative``/``quantile`` (they rank as value 0).
    """
    by, col = policy.filter_by, policy.select_value
    for c in (by, col):
        if c not in samples.columns:
            raise ValueError(f"curate: value column {c!r} is not in the value table ({samples.columns})")
    cols = list(dict.fromkeys([by, col]))
    scored = (
        train.select("sample_id")
        .join(samples.select("sample_id", *cols), on="sample_id", how="left")
        .with_columns([pl.col(c).fill_null(0.0) for c in cols])
    )
    kept = keep_ids(scored, policy.drop, policy.quantile, by).select("sample_id", pl.col(col).alias("prior_value"))
    return by_value(train.join(kept, on="sample_id", how="inner"))


def build_plan(
    phases: Phases, policy: CurateConfig, n_train: int, n_kept: int, source_run: str | None = None
) -> SelectionPlan:
    """The plan: phases, filter outcome and the selection / reorder windows of the next run."""
    return SelectionPlan(
        source_run=source_run,
        source_total_steps=phases.total_steps,
        phases=phases,
        policy=policy.model_dump(mode="json"),
        n_train=n_train,
        n_kept=n_kept,
        n_dropped=n_train - n_kept,
        order=f"{policy.select_value} descending",
        windows=plan_windows(phases, policy.reorder, policy.select, list(policy.select_phases), policy.select_budget),
        pool_factor=policy.pool_factor,
        stratify=policy.select_stratify,
        val_every=policy.val_every,
        val_samples=policy.val_samples,
    )


def write_plan(path, plan: SelectionPlan) -> None:
    write_json(path, plan.model_dump(mode="json"))


def read_plan(path) -> SelectionPlan:
    return SelectionPlan.model_validate_json(Path(path).read_text())


def curate(run: RunDir, cfg: RunConfig) -> str:
    """Write curation/curated.parquet (kept training rows, most valuable first) and curation/plan.json."""
    run.require("score")
    policy = cfg.curate
    samples = pl.read_parquet(run.samples)
    train = pl.read_parquet(run.data("train"))
    curated = curated_table(train, samples, policy)
    with atomic_path(run.curated) as tmp:
        curated.write_parquet(tmp)
    plan = build_plan(run_phases(run, policy), policy, train.height, curated.height, str(run.root))
    write_plan(run.plan, plan)
    return str(run.curated)
