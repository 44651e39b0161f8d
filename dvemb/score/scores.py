"""Scores of training occurrences against validation vectors, and their aggregations.

score(t, z) = grad l_val(theta_c)^T DVEmb^(t -> c)(z): positive = the occurrence helped
(removing it would raise the validation loss).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl
import torch

from dvemb.embed.blocks import align
from dvemb.embed.linear_state import StatePropagator
from dvemb.embed.propagator import Propagator, Vectors
from dvemb.types import StepGrads


def dot_scores(records: Sequence[StepGrads], validation: Vectors) -> list[torch.Tensor]:
    """Per-step [B, V] scores: sum over layers of embeddings @ validation^T."""
    out = []
    for rec in records:
        validation = align(validation, set(rec.grads))
        s = None
        for name, v in validation.items():
            e = rec.grads[name]
            part = e @ v.to(e.device, e.dtype).T
            s = part if s is None else s + part
        out.append(s)
    return out


def segment_scores(
    local: Sequence[Sequence[StepGrads]],
    propagators: Sequence[Propagator | StatePropagator],
    validation: Vectors,
    upto: int | None = None,
) -> list[torch.Tensor]:
    """Scores at checkpoint b_m without materialising global embeddings.

    Propagates the validation vectors instead: U_{m-1} = v, U_{j-1} = K_j^T U_j, and scores
    segment j's local embeddings against U_j. Same numbers as ``dot_scores(compose(...))``. Propagators of an
    optimizer's state carry (theta, m[, v]): v is padded with zeros for the moments.
    """
    m = len(propagators) if upto is None else upto
    parts, u = [], None
    for j in range(m - 1, -1, -1):
        seg = local[j]  # one read of each segment's embeddings and (j > 0) propagator
        u = u if u is not None else seeded(validation, seg[0].grads)
        parts.append(dot_scores(seg, u))
        if j > 0:
            u = propagators[j].apply(u, transpose=True)
    return [s for part in reversed(parts) for s in part]


def seeded(validation: Vectors, embeddings: Vectors) -> Vectors:
    """Validation rows [V, D] in the layout of ``embeddings`` (block -> [B, n D]): merged when they are, and
    zero-padded to n D where the embeddings carry an optimizer's state (theta, m[, v]) — a score reads theta."""
    out = {}
    for n, x in align(dict(validation), set(embeddings)).items():
        width = embeddings[n].shape[1]
        if width % x.shape[1]:
            raise ValueError(f"block {n!r}: validation vectors of width {x.shape[1]}, embeddings of width {width}")
        out[n] = torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1) if width > x.shape[1] else x
    return out


def occurrence_table(
    records: Sequence[StepGrads], scores: Sequence[torch.Tensor], checkpoint: int | None = None
) -> pl.DataFrame:
    """One row per occurrence: sample_id, step, score (mean over validation vectors) [, checkpoint]."""
    steps = torch.cat([torch.full((len(r.sample_ids),), r.step, dtype=torch.int64) for r in records])
    ids = torch.cat([r.sample_ids for r in records])
    score = torch.cat([s.mean(dim=1) for s in scores]).to(torch.float64).cpu()
    df = pl.DataFrame({"sample_id": ids.numpy(), "step": steps.numpy(), "score": score.numpy()})
    if checkpoint is not None:
        df = df.with_columns(pl.lit(checkpoint, dtype=pl.Int64).alias("checkpoint"))
    return df


def window_influence(occurrences: pl.DataFrame, t1: int, t2: int) -> pl.DataFrame:
    """DIT time window: per sample, the summed score of its occurrences in steps [t1, t2).

    ``occurrences`` must hold scores at one checkpoint c >= t2.
    """
    if "checkpoint" in occurrences.columns:
        cps = occurrences["checkpoint"].unique().to_list()
        if len(cps) != 1 or cps[0] < t2:
            raise ValueError(f"window [{t1}, {t2}) needs scores at one checkpoint >= {t2}, got {cps}")
    return (
        occurrences.filter((pl.col("step") >= t1) & (pl.col("step") < t2))
        .group_by("sample_id")
        .agg(pl.col("score").sum().alias("influence"), pl.len().alias("n_occurrences"))
        .sort("sample_id")
    )


def sample_values(occurrences: pl.DataFrame) -> pl.DataFrame:
    """Per sample: value = sum over all its occurrences (all-epoch removal), n_occurrences."""
    return (
        occurrences.group_by("sample_id")
        .agg(pl.col("score").sum().alias("value"), pl.len().alias("n_occurrences"))
        .sort("sample_id")
    )
