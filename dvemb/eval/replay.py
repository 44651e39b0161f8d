"""Exact replay of a recorded SGD trajectory, and trajectory-specific leave-one-out (TSLOO).

The same :func:`sgd_step` runs the original training and every replay, so a replay with
nothing removed reproduces the recorded parameters bit for bit. Removing occurrence z from
step s sets its loss weight to 0 at that step only (the other weights are unchanged):
``L_s = sum_{z' != z} w_{s,z'} l_{z'}``, exactly the perturbation DVEmb linearises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dvemb.embed.segments import Schedule
from dvemb.task import masked_cross_entropy as per_sample_cross_entropy

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Batch:
    """One optimizer step's data. x: [B, ...]; y: [B, ...]; weights: [B] loss coefficients w."""

    sample_ids: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor


def sgd_step(
    model: nn.Module,
    params: Params,
    batch: Batch,
    lr: float,
    weight_decay: float = 0.0,
    loss_fn: LossFn = per_sample_cross_entropy,
    weights: torch.Tensor | None = None,
) -> Params:
    """theta <- (1 - lr*wd) theta - lr * grad sum_z w_z l_z(theta). Hooks on ``model`` fire as usual."""
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    w = batch.weights if weights is None else weights
    loss = (
        w.to(batch.x.dtype if batch.x.is_floating_point() else torch.get_default_dtype())
        * loss_fn(functional_call(model, p, (batch.x,)), batch.y)
    ).sum()
    grads = torch.autograd.grad(loss, list(p.values()))
    c = 1.0 - lr * weight_decay
    return {k: c * v.detach() - lr * g for (k, v), g in zip(p.items(), grads)}


def mean_loss(
    model: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn = per_sample_cross_entropy
) -> float:
    """Mean per-sample loss of ``params`` on (x, y)."""
    with torch.no_grad():
        return float(loss_fn(functional_call(model, params, (x,)), y).mean())


def replay(
    model: nn.Module,
    start: Params,
    batches: Sequence[Batch],
    first_step: int,
    schedule: Schedule,
    drop: tuple[int, int] | None = None,
    loss_fn: LossFn = per_sample_cross_entropy,
) -> Params:
    """Run ``batches`` (steps first_step, first_step+1, …) from ``start``.

    drop: (step, position in that step's batch) of the one occurrence removed, or None.
    """
    params = start
    for i, b in enumerate(batches):
        step = first_step + i
        lr, wd = schedule.at(step)
        w = None
        if drop is not None and drop[0] == step:
            w = b.weights.clone()
            w[drop[1]] = 0.0
        params = sgd_step(model, params, b, lr, wd, loss_fn, weights=w)
    return params


def functional_sgd_step(model: nn.Module, loss_fn: LossFn = per_sample_cross_entropy):
    """``step(params, batch, weights, lr, c) -> params``: one coupled-decay SGD step, vmap-able over lanes."""

    def step(p: Params, b: Batch, w: torch.Tensor, lr: float, c: float) -> Params:
        def total(q: Params) -> torch.Tensor:
            return (w * loss_fn(functional_call(model, q, (b.x,)), b.y)).sum()

        g = grad(total)(p)
        return {k: c * v - lr * g[k] for k, v in p.items()}

    return step


def tsloo(
    model: nn.Module,
    checkpoints: Sequence[Params],
    batches: Sequence[Batch],
    schedule: Schedule,
    occurrences: Sequence[tuple[int, int]],
    val: tuple[torch.Tensor, torch.Tensor],
    loss_fn: LossFn = per_sample_cross_entropy,
) -> torch.Tensor:
    """Exact TSLOO ``l_val(theta'_T) - l_val(theta_T)`` for each (step, position) occurrence.

    checkpoints[t] = theta_t (before step t) for every step t; positive = the occurrence helped.
    Replays that start at the same step run together under ``torch.func.vmap``.
    """
    final = replay(model, checkpoints[0], batches, 0, schedule, loss_fn=loss_fn)
    base = mean_loss(model, final, *val, loss_fn=loss_fn)

    step_fn = functional_sgd_step(model, loss_fn)

    def val_loss(p: Params) -> torch.Tensor:
        return loss_fn(functional_call(model, p, (val[0],)), val[1]).mean()

    out = torch.empty(len(occurrences), dtype=torch.float64)
    by_step: dict[int, list[int]] = {}
    for i, (step, _) in enumerate(occurrences):
        by_step.setdefault(step, []).append(i)
    for step, rows in sorted(by_step.items()):
        n = len(rows)
        params = {k: v.detach().expand(n, *v.shape).clone() for k, v in checkpoints[step].items()}
        w0 = batches[step].weights.to(torch.get_default_dtype()).expand(n, -1).clone()
        w0[torch.arange(n), torch.tensor([occurrences[i][1] for i in rows])] = 0.0
        for t in range(step, len(batches)):
            lr, wd = schedule.at(t)
            b = batches[t]
            w = w0 if t == step else b.weights.to(w0.dtype).expand(n, -1)
            params = vmap(step_fn, in_dims=(0, None, 0, None, None))(params, b, w, lr, 1.0 - lr * wd)
        with torch.no_grad():
            out[rows] = vmap(val_loss)(params).to(torch.float64) - base
    return out
