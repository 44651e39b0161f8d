"""The per-sample value table (scores/samples.parquet) and the training phases it is split by.

A sample's *value* is the summed score of its occurrences (DIT all-epoch removal, docs/DESIGN.md §9):
positive = it helped the validation loss. The table breaks the value down by epoch, by training
phase (early / middle / late) and by checkpoint (the value measured on the model at an
intermediate influence checkpoint, from the occurrences before it).

Phases come from the run itself: the per-step influence curve (mean |score| of a step's
occurrences at the final checkpoint, smoothed, on a log scale because influence decays
geometrically through the propagators) has a low *basin*; the early phase is everything before
the curve enters the basin, the late phase everything after it leaves it. Or they are given
(``curate.phases = [early_end, late_start]``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, model_validator

from dvemb.config import CurateConfig
from dvemb.store.rundir import RunDir
from dvemb.store.trajectory import read_steps

PHASES = ("early", "middle", "late")


class Phases(BaseModel):
    """Steps [0, early_end) are early, [early_end, late_start) middle, [late_start, total_steps) late."""

    model_config = ConfigDict(extra="forbid")

    total_steps: int
    early_end: int
    late_start: int
    method: Literal["detected", "config"] = "detected"
    threshold: float | None = None
    smooth: int | None = None

    @model_validator(mode="after")
    def _order(self) -> Phases:
        if not 0 <= self.early_end <= self.late_start <= self.total_steps:
            raise ValueError(
                f"phases need 0 <= early_end <= late_start <= total_steps, got "
                f"{self.early_end}, {self.late_start}, {self.total_steps}"
            )
        return self

    def window(self, phase: str) -> tuple[int, int]:
        """[start, stop) of ``phase`` (may be empty)."""
        if phase == "early":
            return 0, self.early_end
        if phase == "middle":
            return self.early_end, self.late_start
        if phase == "late":
            return self.late_start, self.total_steps
        raise ValueError(f"unknown phase {phase!r}; choose one of {PHASES}")

    def expr(self, step: str = "step") -> pl.Expr:
        """Polars expression naming the phase of column ``step``."""
        s = pl.col(step)
        return (
            pl.when(s < self.early_end)
            .then(pl.lit("early"))
            .when(s < self.late_start)
            .then(pl.lit("middle"))
            .otherwise(pl.lit("late"))
        )


def final_occurrences(occ: pl.DataFrame) -> pl.DataFrame:
    """The occurrence scores at the final checkpoint (all of them when there is no checkpoint column)."""
    if "checkpoint" not in occ.columns or occ.is_empty():
        return occ
    return occ.filter(pl.col("checkpoint") == occ["checkpoint"].max())


def step_curve(occ: pl.DataFrame, total_steps: int, lr: np.ndarray | None = None) -> np.ndarray:
    """Mean |score| per step at the final checkpoint, float64 [total_steps] (0 where a step has no rows).

    lr: the per-step LR; when given the curve is divided by it (steps with LR 0 count as 0), so a
    schedule's warm-up and decay do not masquerade as phases of the data's influence.
    """
    curve = np.zeros(total_steps, dtype=np.float64)
    per = (
        final_occurrences(occ)
        .filter(pl.col("step") < total_steps)
        .group_by("step")
        .agg(pl.col("score").abs().mean().alias("m"))
    )
    if per.height:
        curve[per["step"].to_numpy()] = per["m"].to_numpy()
    if lr is not None:
        lr = np.asarray(lr, dtype=np.float64)[:total_steps]
        curve = np.divide(curve, lr, out=np.zeros_like(curve), where=lr > 0)
    return curve


def smooth_curve(curve: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average with edge-shrunk windows (same length as ``curve``)."""
    if window <= 1 or len(curve) == 0:
        return curve.astype(np.float64)
    c = np.concatenate([[0.0], np.cumsum(curve, dtype=np.float64)])
    n = len(curve)
    half = window // 2
    lo = np.clip(np.arange(n) - half, 0, n)
    hi = np.clip(np.arange(n) + (window - half), 0, n)
    return (c[hi] - c[lo]) / (hi - lo)


def detect_phases(curve: np.ndarray, threshold: float = 0.5, smooth: int | None = None) -> tuple[int, int]:
    """(early_end, late_start) from a per-step influence curve.

    The curve is smoothed (window ``smooth``, default ~T/20), put on a log scale, and the basin is
    the contiguous run of steps around its minimum that stays below
    ``min + threshold * (max - min)``. A flat curve (or an empty one) is all basin: no early and no
    late phase.
    """
    n = len(curve)
    if n == 0:
        return 0, 0
    w = smooth if smooth is not None else max(1, round(n / 20))
    s = smooth_curve(np.abs(np.asarray(curve, dtype=np.float64)), w)
    positive = s[s > 0]
    if positive.size == 0:
        return 0, n
    s = np.log(np.maximum(s, positive.min() * 1e-3))
    lo, hi = float(s.min()), float(s.max())
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return 0, n
    below = s <= lo + threshold * (hi - lo)
    i = int(np.argmin(s))
    start, stop = i, i + 1
    while start > 0 and below[start - 1]:
        start -= 1
    while stop < n and below[stop]:
        stop += 1
    return start, stop


def phases_for(
    occ: pl.DataFrame,
    total_steps: int,
    given: list[int] | tuple[int, int] | None = None,
    threshold: float = 0.5,
    smooth: int | None = None,
    lr: np.ndarray | None = None,
) -> Phases:
    """The run's phases: ``given`` = [early_end, late_start] (clipped to the run), else detected.

    lr: per-step LR to normalise the influence curve by (see :func:`step_curve`); None = raw curve.
    """
    if given is not None:
        early, late = (min(max(0, int(x)), total_steps) for x in given)
        return Phases(total_steps=total_steps, early_end=early, late_start=max(early, late), method="config")
    early, late = detect_phases(step_curve(occ, total_steps, lr), threshold, smooth)
    return Phases(total_steps=total_steps, early_end=early, late_start=late, threshold=threshold, smooth=smooth)


def value_table(occ: pl.DataFrame, phases: Phases) -> pl.DataFrame:
    """Per-sample values from ``occurrences`` (sample_id, step, epoch, score[, checkpoint]).

    Columns: sample_id, value (sum at the final checkpoint), n_occurrences, value_epoch_<e>,
    value_early / value_middle / value_late (+ n_early / n_middle / n_late), and
    value_ckpt_<b> for every intermediate checkpoint b (occurrences before b, scored on the
    model at b). Missing combinations are 0. Sorted by sample_id.
    """
    final = final_occurrences(occ)
    base = (
        final.group_by("sample_id")
        .agg(pl.col("score").sum().alias("value"), pl.len().cast(pl.Int64).alias("n_occurrences"))
        .sort("sample_id")
    )
    parts = []
    if "epoch" in final.columns:
        parts.append(_wide(final, pl.col("epoch").cast(pl.Utf8), "value_epoch_", sort_int=True))
    tagged = final.with_columns(phases.expr().alias("_phase"))
    for p in PHASES:
        sel = tagged.filter(pl.col("_phase") == p)
        parts.append(
            base.select("sample_id")
            .join(
                sel.group_by("sample_id").agg(
                    pl.col("score").sum().alias(f"value_{p}"), pl.len().cast(pl.Int64).alias(f"n_{p}")
                ),
                on="sample_id",
                how="left",
            )
            .select("sample_id", f"value_{p}", f"n_{p}")
        )
    if "checkpoint" in occ.columns and occ.height:
        last = occ["checkpoint"].max()
        inter = occ.filter(pl.col("checkpoint") < last)
        if inter.height:
            parts.append(_wide(inter, pl.col("checkpoint").cast(pl.Utf8), "value_ckpt_", sort_int=True))
    out = base
    for p in parts:
        out = out.join(p, on="sample_id", how="left")
    fill = [c for c in out.columns if c not in ("sample_id",)]
    return out.with_columns([pl.col(c).fill_null(0) for c in fill]).sort("sample_id")


def _wide(df: pl.DataFrame, key: pl.Expr, prefix: str, sort_int: bool = False) -> pl.DataFrame:
    """Per-sample score sums, one column per value of ``key`` (named prefix + key)."""
    long = df.with_columns(key.alias("_k")).group_by("sample_id", "_k").agg(pl.col("score").sum())
    keys = sorted(long["_k"].unique().to_list(), key=int if sort_int else str)
    wide = long.pivot(on="_k", index="sample_id", values="score")
    return wide.select("sample_id", *[pl.col(k).alias(f"{prefix}{k}") for k in keys])


def run_phases(run: RunDir, policy: CurateConfig, occ: pl.DataFrame | None = None) -> Phases:
    """The source run's phases (detected from its occurrence scores, or the configured ones)."""
    occ = pl.read_parquet(run.occurrences) if occ is None else occ
    lr = read_steps(run)["lr"].to_numpy() if policy.phase_curve == "per_lr" else None
    return phases_for(occ, run.boundaries[-1], policy.phases, policy.phase_threshold, policy.phase_smooth, lr)
