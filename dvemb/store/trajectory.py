"""Reading the recorded trajectory back: the schedule and the epoch of every step."""

from __future__ import annotations

import polars as pl

from dvemb.errors import StoreError
from dvemb.store.rundir import RunDir
from dvemb.types import Schedule


def read_steps(run: RunDir) -> pl.DataFrame:
    if not run.steps.exists():
        raise StoreError(f"{run.steps}: missing — training did not finish")
    df = pl.read_parquet(run.steps).sort("step")
    gaps = set(range(df.height)) - set(df["step"].to_list())
    if gaps:
        raise StoreError(f"{run.steps}: steps {sorted(gaps)[:10]} are missing from the trajectory")
    return df


def read_schedule(run: RunDir) -> Schedule:
    """Per-step LR actually applied and weight decay, as recorded."""
    df = read_steps(run)
    return Schedule(lr=df["lr"].to_list(), weight_decay=df["weight_decay"].to_list())
