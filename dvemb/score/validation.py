"""Projected validation gradients at a checkpoint, with the same projections as the store."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from dvemb.capture.hooks import GradientCapture
from dvemb.capture.projection import LayerProjection
from dvemb.embed.propagator import Vectors
from dvemb.models.loss import per_sample_cross_entropy
from dvemb.store.gradstore import check_same_projection

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> [B] losses


def validation_gradients(
    model: nn.Module,
    capture: GradientCapture,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: LossFn = per_sample_cross_entropy,
    reduce: bool = True,
    store_projection: dict[str, LayerProjection] | None = None,
) -> Vectors:
    """Projected gradients of the validation losses: layer -> [V, D].

    reduce=True: V = 1, the gradient of the mean validation loss; else one row per sample.
    store_projection: the training store's projection; a mismatch raises ProjectionMismatchError.
    """
    if store_projection is not None:
        check_same_projection(store_projection, capture.specs, where="validation gradients")
    rows: list[Vectors] = []
    n = 0
    for x, y in batches:
        with capture.micro_batch(torch.arange(n, n + len(x)), weight=1.0):
            loss_fn(model(x), y).sum().backward()
        rows.append(capture.collect(step=-1).grads)
        n += len(x)
    model.zero_grad(set_to_none=True)
    out = {name: torch.cat([r[name] for r in rows]) for name in capture.tracked}
    return {k: v.mean(0, keepdim=True) for k, v in out.items()} if reduce else out
