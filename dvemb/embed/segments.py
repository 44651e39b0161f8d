"""Embedding a run of steps (Algorithm 1) and composing segments (Algorithm 2).

A segment [b_j, b_{j+1}) processed from a fresh propagator gives *local* embeddings
DVEmb^(t -> b_{j+1}) and the segment propagator K_j = A_{b_{j+1}-1} … A_{b_j}. Embeddings at
checkpoint b_m are K_{m-1} … K_{j+1} applied to the local ones. The sequential algorithm is the
one-segment case.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from dvemb.embed.blocks import check_blocks, merge_curvature, merge_schedule, merge_step
from dvemb.embed.clipping import clip_direction
from dvemb.embed.propagator import Curvature, Propagator
from dvemb.types import Schedule, StepGrads

CurvatureFn = Callable[[StepGrads], Curvature]


def embed_steps(
    records: Sequence[StepGrads],
    schedule: Schedule,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    curvature: CurvatureFn | None = None,
    blocks: str = "layer",
) -> tuple[list[StepGrads], Propagator]:
    """Backward recursion over consecutive ``records`` (ascending steps) from Q = I.

    schedule: the LR / decay per step; where it carries param groups (``Schedule.layer_groups``) each
    layer, or each stored coordinate, follows its own parameters' group.
    blocks: "layer" (one M per layer) or "model" (one M over all layers; see :mod:`dvemb.embed.blocks`).

    Returns the embeddings (same rows as ``records``; ``grads`` holds DVEmb to the end of the
    run of steps) and the propagator A_{last} … A_{first} of the whole run.
    """
    for prev, nxt in zip(records, records[1:]):
        if nxt.step != prev.step + 1:
            raise ValueError(f"steps must be consecutive: step {nxt.step} follows step {prev.step}")
    check_blocks(blocks)
    if blocks == "model":
        schedule = merge_schedule(schedule, {n: g.shape[1] for n, g in records[0].grads.items()})
        records, curvature = [merge_step(r) for r in records], merge_curvature(curvature)
    dims = {n: g.shape[1] for n, g in records[0].grads.items()}
    prop = Propagator(dims, dtype, device)
    out = []
    for rec in reversed(records):
        lr, wd = schedule.rates(rec.step, dims)
        clip = clip_direction(rec, schedule.clipped_norm(rec.step), dtype)
        emb = prop.step(rec, lr, wd, curvature(rec) if curvature else None, clip)
        out.append(StepGrads(rec.step, rec.sample_ids, rec.weights, emb))
    out.reverse()
    return out, prop


def compose(
    local: Sequence[Sequence[StepGrads]], propagators: Sequence[Propagator], upto: int | None = None
) -> list[StepGrads]:
    """Global embeddings at checkpoint b_m (m = ``upto``, default K = the end of the run).

    local[j]: segment j's local embeddings; propagators[j]: K_j. Only segments j < m contribute.
    """
    m = len(propagators) if upto is None else upto
    if not 0 <= m <= len(propagators):
        raise ValueError(f"checkpoint index {m} outside 0..{len(propagators)}")
    if m == 0:
        return []
    p0 = propagators[0]
    r = type(p0)(p0.dims, p0.dtype, p0.device)  # R = K_{m-1} … K_{j+1}, identity for j = m-1
    parts: list[list[StepGrads]] = []
    for j in range(m - 1, -1, -1):
        parts.append(local[j] if j == m - 1 else _apply_rows(r, local[j]))
        if j > 0:
            r.compose(propagators[j])
    return [e for part in reversed(parts) for e in part]


def _apply_rows(r: Propagator, steps: Sequence[StepGrads]) -> list[StepGrads]:
    """R applied to every row of a segment in one matmul per layer group."""
    sizes = [len(e.sample_ids) for e in steps]
    out = r.apply({n: torch.cat([e.grads[n] for e in steps]) for n in steps[0].grads})
    split = {n: v.split(sizes) for n, v in out.items()}
    return [StepGrads(e.step, e.sample_ids, e.weights, {n: split[n][i] for n in split}) for i, e in enumerate(steps)]
