"""Filter and reorder policies over the per-sample value table (scores/samples.parquet)."""

from __future__ import annotations

import polars as pl


def keep_ids(samples: pl.DataFrame, drop: str, quantile: float = 0.1, by: str = "value") -> pl.DataFrame:
    """Rows of ``samples`` (sample_id, value, …) that survive the policy, ranked by column ``by``.

    drop="negative": drop ``by`` < 0; "quantile": drop the lowest ``quantile`` fraction (ties
    broken by sample_id, so the count is exact); "none": keep all.
    """
    if by not in samples.columns:
        raise ValueError(f"curate.filter_by {by!r}: no such column in the value table ({samples.columns})")
    if drop == "none":
        return samples
    if drop == "negative":
        return samples.filter(pl.col(by) >= 0)
    if drop == "quantile":
        n_drop = int(round(quantile * samples.height))
        return samples.sort([by, "sample_id"]).slice(n_drop)
    raise ValueError(f"curate.drop {drop!r}: choose 'negative', 'quantile' or 'none'")


def by_value(table: pl.DataFrame, column: str = "prior_value") -> pl.DataFrame:
    """``table`` most valuable first; ties by ascending sample_id (deterministic)."""
    return table.sort([column, "sample_id"], descending=[True, False])
