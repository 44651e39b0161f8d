"""Curvature block structure: one block per layer (block-diagonal H, the default) or one for the model.

``embed.blocks: model`` concatenates every layer's projected vector (in sorted layer order) into one
vector named ``model``, so M couples the layers (the full-matrix recursion). Scores are unchanged in
meaning — a score is a dot product over all layers either way — but the curvature is no longer
block-diagonal. M is D_total x D_total instead of one D_l x D_l per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from dvemb.embed.propagator import Curvature, Vectors
from dvemb.types import Schedule, StepGrads

MODEL = "model"
BLOCKS = ("layer", "model")


def merge_layers(vecs: Vectors) -> Vectors:
    """layer -> [n, D_l]  to  {"model": [n, sum D_l]} (sorted layer order); already merged: unchanged."""
    if set(vecs) == {MODEL}:
        return vecs
    return {MODEL: torch.cat([vecs[n] for n in sorted(vecs)], dim=1)}


def merge_step(rec: StepGrads) -> StepGrads:
    return StepGrads(rec.step, rec.sample_ids, rec.weights, merge_layers(rec.grads))


def merge_schedule(schedule: Schedule, dims: Mapping[str, int]) -> Schedule:
    """The schedule of the merged ``model`` vector: each layer's param groups laid out per coordinate in
    sorted layer order (as :func:`merge_layers`). dims: layer -> D_l. Without param groups: unchanged."""
    if not schedule.per_layer or set(dims) == {MODEL}:
        return schedule
    missing = sorted(set(dims) - set(schedule.layer_groups))
    if missing:
        raise ValueError(f"embed.blocks model: the schedule has no param group for layers {missing}")
    parts = []
    for n in sorted(dims):
        g = schedule.layer_groups[n]
        parts.append(torch.full((dims[n],), g, dtype=torch.int64) if isinstance(g, int) else g.to(torch.int64))
    return replace(schedule, layer_groups={MODEL: torch.cat(parts)})


def merge_curvature(fn: Callable[[StepGrads], Curvature] | None) -> Callable[[StepGrads], Curvature] | None:
    """Wrap a per-step curvature function so its vectors are merged too (``None`` stays empirical; a product
    takes either layout)."""
    if fn is None:
        return None

    def merged(rec: StepGrads) -> Curvature:
        c = fn(rec)
        return c if c.product is not None else Curvature(merge_layers(c.vectors), c.coef)

    return merged


def align(validation: Vectors, layers: set[str]) -> Vectors:
    """Validation vectors in the layout of the embeddings (merged when the embeddings are)."""
    return merge_layers(validation) if layers == {MODEL} and set(validation) != {MODEL} else validation


def check_blocks(blocks: str) -> None:
    if blocks not in BLOCKS:
        raise ValueError(f"embed.blocks {blocks!r}: choose one of {BLOCKS}")
