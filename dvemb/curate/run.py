"""Stage ``curate``: the next run's training table and its plan, from the per-sample values."""

from __future__ import annotations

import polars as pl

from dvemb.config import RunConfig
from dvemb.curate.filter import keep_ids
from dvemb.store.atomic import atomic_path, write_json
from dvemb.store.rundir import RunDir


def curate(run: RunDir, cfg: RunConfig) -> str:
    """Write curation/curated.parquet (kept training rows, most valuable first) and curation/plan.json."""
    run.require("score")
    samples = pl.read_parquet(run.samples)
    kept = keep_ids(samples, cfg.curate.drop, cfg.curate.quantile).select("sample_id", "value")
    train = pl.read_parquet(run.data("train"))
    curated = train.join(kept, on="sample_id", how="inner").sort("value", descending=True).drop("value")
    with atomic_path(run.curated) as tmp:
        curated.write_parquet(tmp)
    write_json(
        run.plan,
        {
            "source_run": str(run.root),
            "policy": cfg.curate.model_dump(),
            "n_train": train.height,
            "n_kept": curated.height,
            "n_dropped": train.height - curated.height,
            "order": "value descending",
        },
    )
    return str(run.curated)
