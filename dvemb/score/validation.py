"""Projected validation gradients at a checkpoint, with the same projections as the store."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dvemb.capture.hooks import GradientCapture
from dvemb.embed.propagator import Vectors
from dvemb.store.gradstore import check_same_projection
from dvemb.task import Batch, Task
from dvemb.types import LayerProjection


def validation_gradients(
    task: Task,
    model: nn.Module,
    capture: GradientCapture,
    batches: Iterable[Batch],
    reduce: bool = True,
    store_projection: dict[str, LayerProjection] | None = None,
) -> Vectors:
    """Projected gradients of the validation losses (``task.per_sample_loss`` of batch dicts with a
    ``sample_id``): layer -> [V, D], rows in batch order.

    reduce=True: V = 1, the gradient of the mean validation loss; else one row per sample.
    store_projection: the training store's projection; a mismatch raises ProjectionMismatchError.
    ``Task()`` (the base class) is the cross-entropy of ``model(batch["x"])`` against ``batch["y"]``.
    """
    if store_projection is not None:
        check_same_projection(store_projection, capture.specs, where="validation gradients")
    rows: list[Vectors] = []
    n = 0
    for batch in batches:
        b = len(task.sample_ids(batch))
        with capture.micro_batch(torch.arange(n, n + b), weight=1.0):
            task.per_sample_loss(model, batch).sum().backward()
        rows.append(capture.collect(step=-1).grads)
        n += b
    model.zero_grad(set_to_none=True)
    out = {name: torch.cat([r[name] for r in rows]) for name in capture.tracked}
    return {k: v.mean(0, keepdim=True) for k, v in out.items()} if reduce else out
