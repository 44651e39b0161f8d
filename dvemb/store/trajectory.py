"""Reading the recorded trajectory back: the schedule (per param group) and the epoch of every step."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import polars as pl
import torch

from dvemb.errors import StoreError
from dvemb.store.gradstore import read_projection
from dvemb.store.rundir import RunDir
from dvemb.types import LayerProjection, Schedule, clipped_norms, row_columns, selection

log = logging.getLogger(__name__)


def read_steps(run: RunDir) -> pl.DataFrame:
    if not run.steps.exists():
        raise StoreError(f"{run.steps}: missing — training did not finish")
    df = pl.read_parquet(run.steps).sort("step")
    gaps = set(range(df.height)) - set(df["step"].to_list())
    if gaps:
        raise StoreError(f"{run.steps}: steps {sorted(gaps)[:10]} are missing from the trajectory")
    return df


def read_schedule(run: RunDir) -> Schedule:
    """Per-step LR actually applied and weight decay, as recorded; per param group and captured layer too
    when the optimizer had several groups (nanoGPT decay / no-decay, per-group LR).

    Group i at step t: LR ``group_lr[t][i] * clip_factor[t]`` and decay factor ``1 - group_lr * group_wd``
    (SGD's coupled decay; AdamW's proxy keeps no decay, as the ``weight_decay`` column). A step whose update
    was skipped (AMP overflow, recorded ``lr`` 0) applies nothing in any group.
    """
    df = read_steps(run)
    lr, wd = df["lr"].to_list(), df["weight_decay"].to_list()
    opt = run.meta().get("optimizer") or {}
    groups = [g["params"] for g in opt.get("groups", [])]
    clip = df["clip_factor"].to_list() if "clip_factor" in df.columns else [1.0] * df.height
    max_norm = opt.get("grad_clip")
    norms = clipped_norms(clip, max_norm) if max_norm is not None else None
    if len(groups) < 2 or "group_lr" not in df.columns or not run.projection.exists():
        return Schedule(lr=lr, weight_decay=wd, clip_norm=norms)
    sgd = opt.get("kind") == "sgd"
    group_lr, group_wd = [], []
    rows = zip(lr, df["group_lr"].to_list(), df["group_weight_decay"].to_list(), clip)
    for t, (lr_t, glr, gwd, c) in enumerate(rows):
        if len(glr) != len(groups) or len(gwd) != len(groups):
            raise StoreError(f"{run.steps}: step {t} records {len(glr)} group LRs for {len(groups)} param groups")
        skipped = was_skipped(lr_t, glr, c)
        group_lr.append([0.0 if skipped else x * c for x in glr] + [0.0])  # last: frozen (no group)
        group_wd.append([(w / c if sgd and c > 0 else 0.0) for w in gwd] + [0.0])
    group_of = {p: i for i, ps in enumerate(groups) for p in ps}
    specs = read_projection(run.projection)
    layers = {n: stored_groups(n, s, group_of, frozen=len(groups)) for n, s in specs.items()}
    return Schedule(lr, wd, group_lr, group_wd, layers, clip_norm=norms)


def was_skipped(lr: float, group_lr: Sequence[float], clip: float) -> bool:
    """A step whose update the AMP scaler skipped: recorded with ``lr`` 0 while its groups' LRs were not."""
    return lr == 0.0 and group_lr[0] * clip != 0.0


def stored_groups(layer: str, spec: LayerProjection, group_of: Mapping[str, int], frozen: int) -> int | torch.Tensor:
    """The param group of each stored coordinate of a captured layer: an int when one group covers it,
    else a [dim] int64 tensor. ``frozen``: the index standing for a parameter in no group (not trained).

    A layer's stored matrix is G [d_out, d_in] (the bias, the parameter named ``*.bias``, is its last column
    when there is one; dvemb.capture.layers) projected as ``P_s G P_a^T``: columns keep their parameter when the a
    side is exact or a coordinate subsample; ``rowwise`` coordinates (i, j) = G[row_i, cols[i, j]] each take the
    group of their own column (flattened row-major). Under a Gaussian a side (or the elementwise sketch) weight and
    bias columns mix: the whole layer then follows its weight's group, an approximation for the bias
    coordinates when the bias is in another group (nanoGPT's no-decay biases).
    """
    if not spec.params:  # a store from before parameter names were recorded: the first group's schedule
        return 0
    if not (spec.bias and len(spec.params) > 1):
        return group_of.get(spec.params[0], frozen)
    bias = next((p for p in spec.params if p.rsplit(".", 1)[-1] == "bias"), spec.params[-1])
    w = group_of.get(next(p for p in spec.params if p != bias), frozen)
    b = group_of.get(bias, frozen)
    if b == w:
        return w
    rows, cols = spec.shape
    if spec.kind == "elementwise" or not (spec.identity_a or spec.kind in ("subsample", "rowwise")):
        log.info(
            "layer %r: a Gaussian projection mixes weight and bias; its bias (group %d) follows the weight's group %d",
            layer,
            b,
            w,
        )
        return w
    if spec.identity_a:
        col = torch.arange(cols).repeat(rows)
    elif spec.kind == "rowwise":  # each stored row has its own columns
        col = row_columns(rows, spec.k_a, spec.d_in, spec.seed).reshape(-1)
    else:  # the stored columns are a subsample of G's columns
        col = selection(spec.k_a, spec.d_in, spec.seed).argmax(1).repeat(rows)
    return torch.where(col == spec.d_in - 1, b, w).to(torch.int64)
