"""Filter policies over the per-sample value table (scores/samples.parquet)."""

from __future__ import annotations

import polars as pl


def keep_ids(samples: pl.DataFrame, drop: str, quantile: float = 0.1) -> pl.DataFrame:
    """Rows of ``samples`` (sample_id, value, …) that survive the policy.

    drop="negative": drop value < 0; "quantile": drop the lowest ``quantile`` fraction (ties
    broken by sample_id, so the count is exact); "none": keep all.
    """
    if drop == "none":
        return samples
    if drop == "negative":
        return samples.filter(pl.col("value") >= 0)
    if drop == "quantile":
        n_drop = int(round(quantile * samples.height))
        return samples.sort(["value", "sample_id"]).slice(n_drop)
    raise ValueError(f"curate.drop {drop!r}: choose 'negative', 'quantile' or 'none'")
