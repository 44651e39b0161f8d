"""Flow ``retrain``: the closed loop — retrain on the curated data with its plan, compare with the baseline.

Every (variant, seed) fit is one task, run one after the other (each trains with all the CPU it gets);
the comparison (mean ± sd over seeds, same validation and test sets) becomes a Prefect table artifact.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE

from dvemb.config import RunConfig
from dvemb.curate.retrain import Variant, comparison_rows, fit_variant, write_comparison
from dvemb.curate.run import read_plan
from dvemb.store.rundir import RunDir
from flows.common import resolve_out


@task(name="retrain-variant", task_run_name="retrain-{variant}-seed-{seed}", cache_policy=NO_CACHE)
def retrain_variant(config: RunConfig, out: str, variant: str, seed: int) -> dict:
    """One fit: ``baseline`` (the run's training table, uniform batches) or ``curated`` (curated table + plan)."""
    run = RunDir(out)
    if variant == "baseline":
        v = Variant("baseline", run.data("train"))
    else:
        v = Variant("curated", run.curated, read_plan(run.plan))
    return fit_variant(run, config, v, seed, run.root / "retrain" / variant / f"seed-{seed}")


@task(name="compare-variants", cache_policy=NO_CACHE)
def compare(out: str, rows: list[dict]) -> str:
    """RUN/retrain/comparison.{parquet,json} and the table artifact; returns the parquet path."""
    run = RunDir(out)
    summary = write_comparison(rows, run.root / "retrain")
    create_table_artifact(
        comparison_rows(summary),
        key="dvemb-retrain-comparison",
        description="baseline vs curated retraining: mean ± sd over seeds on the same validation and test sets",
    )
    return str(run.root / "retrain" / "comparison.parquet")


@flow(name="retrain")
def retrain(config: RunConfig, out: str, seeds: list[int] = [0, 1, 2]) -> str:  # noqa: B006 (Prefect form default)
    """Retrain the curated run ``out`` (curation/curated.parquet + plan.json) against its baseline."""
    out = resolve_out(out)
    RunDir(out).require("curate")
    rows = [retrain_variant(config, out, v, s) for v in ("baseline", "curated") for s in seeds]
    return compare(out, rows)
