"""Global-norm clipping, linearised: the part of its derivative the clip factor alone misses.

A clipped step applies ``c(g) g`` with ``c = C / (||g|| + eps)`` (torch.nn.utils.clip_grad_norm_; C the max norm,
g every parameter's gradient). Its derivative is not ``c I``::

    d(c g) = c (I - kappa u u^T) dg,      u = g / ||g||,   kappa = ||g|| / (||g|| + eps)

so a perturbation of the gradient (a removed occurrence, the curvature's response to an earlier one) loses its
component along the batch gradient: clipping keeps the update's length. The recursions apply
``P = I - q q^T`` with ``q = sqrt(kappa) u`` on each block's stored coordinates (the block-diagonal part of P
under per-layer blocks, all of it under ``embed.blocks: model``), inner products over a coordinate subsample
scaled by its sampling ratio rho: ``P x = x - q <rho q, x>``. ``||g||`` is recovered from the recorded clip
factor, ``C / c - eps``; a step with ``c = 1`` was not clipped and ``P = I``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dvemb.types import CLIP_EPS, StepGrads, Vectors


def clip_direction(rec: StepGrads, norm: float, dtype: torch.dtype = torch.float64) -> Vectors | None:
    """q per layer ([D], stored coordinates): ``sqrt(kappa) g_t / ||g_t||`` with g_t the sum of the step's rows; None
    for a step that was not clipped (``norm`` 0)."""
    if norm <= 0:
        return None
    scale = (norm / (norm + CLIP_EPS)) ** 0.5 / norm
    return {n: g.to(dtype).sum(0) * scale for n, g in rec.grads.items()}


def project_columns(x: torch.Tensor, q: torch.Tensor, rho: torch.Tensor | None = None) -> torch.Tensor:
    """P x for columns x [..., D, V]: ``x - q <rho q, x>``."""
    rq = q if rho is None else rho * q
    return x - q[..., :, None] * (rq[..., None, :] @ x)


def project_rows(x: torch.Tensor, q: torch.Tensor, rho: torch.Tensor | None = None) -> torch.Tensor:
    """x P for rows x [..., n, D] (P as a matrix, ``I - q (rho q)^T``): ``x - <x, q> rho q``; without rho, P x of
    every row."""
    rq = q if rho is None else rho * q
    return x - (x @ q[..., :, None]) * rq[..., None, :]


def with_clip_directions(
    coef: list[dict[str, dict[str, torch.Tensor]]], records: Sequence[StepGrads], norms: Mapping[int, float]
) -> None:
    """Add each clipped step's q to its linear-state coefficients (key ``q``, per layer; in place). norms: step ->
    ||g_t|| (0 or missing: not clipped)."""
    for c, rec in zip(coef, records, strict=True):
        q = clip_direction(rec, norms.get(rec.step, 0.0), next(iter(c.values()))["a"].dtype)
        if q is not None:
            for n in c:
                c[n]["q"] = q[n]
