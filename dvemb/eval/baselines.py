"""Baseline data-attribution scores on the same captured (projected) gradients as DVEmb.

All return per-step ``[B_t, V]`` tensors aligned with ``records`` (like ``direct_scores``), with the
sign convention of DVEmb: positive = the occurrence helped (removing it would raise the val loss).

* **grad-dot** (no curvature, TracIn with one checkpoint): ``<grad l_val(theta_T), E_t g_{t,z}>``.
* **TracInCP**: ``<grad l_val(theta_{c(t)}), E_t g_{t,z}>`` with c(t) the saved checkpoint nearest to t.

(``E_t``: the step's LR, per layer or per stored coordinate where the schedule carries param groups.)
* **influence function** (damped, at the final model): ``grad l_val^T (H + lambda I)^{-1} g_{t,z}``
  per layer (block-diagonal), H the empirical Fisher ``mean_t sum_z (1/w) g g^T`` of the given
  (final-epoch) records, lambda = ``damping * trace(H) / D``. Removing z moves theta by about
  ``+H^{-1} g`` at a minimum, so this is the predicted val-loss increase (the classic
  ``-grad l_val^T H^{-1} grad l_z`` of up-weighting, sign flipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from dvemb.embed.propagator import Rates, Vectors
from dvemb.types import Schedule, StepGrads


def _dot(rec: StepGrads, validation: Vectors, dtype: torch.dtype, lr: Rates = 1.0) -> torch.Tensor:
    """sum over layers of (eta (.) g) @ v^T: [B, V]; lr one float or layer -> float | [D]."""
    s = None
    for name, v in validation.items():
        eta = lr[name] if isinstance(lr, Mapping) else lr
        g = rec.grads[name].to(dtype)
        part = (g * (eta.to(g.device, dtype) if torch.is_tensor(eta) else float(eta))) @ v.to(dtype).T
        s = part if s is None else s + part
    return s


def _lr(schedule: Schedule, step: int, layers) -> Rates:
    return schedule.rates(step, layers)[0]


def grad_dot(
    records: Sequence[StepGrads], schedule: Schedule, validation: Vectors, dtype: torch.dtype = torch.float64
) -> list[torch.Tensor]:
    """<v, E_t g_{t,z}>: validation layer -> [V, D] at the final model."""
    return [_dot(r, validation, dtype, _lr(schedule, r.step, validation)) for r in records]


def nearest_checkpoint(step: int, checkpoints: Sequence[int]) -> int:
    """The checkpoint step closest to ``step`` (ties: the later one)."""
    return min(checkpoints, key=lambda c: (abs(c - step), -c))


def tracin_cp(
    records: Sequence[StepGrads],
    schedule: Schedule,
    validation_at: Mapping[int, Vectors],
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """TracInCP: validation_at[c] = validation gradients at saved checkpoint c (parameters before step c)."""
    cps = sorted(validation_at)
    out = []
    for r in records:
        v = validation_at[nearest_checkpoint(r.step, cps)]
        out.append(_dot(r, v, dtype, _lr(schedule, r.step, v)))
    return out


def empirical_fisher_matrix(
    records: Sequence[StepGrads], dtype: torch.dtype = torch.float64
) -> dict[str, torch.Tensor]:
    """Per layer [D, D]: mean over steps of sum_z (1/w) g g^T (the Hessian proxy of the mean training loss)."""
    out: dict[str, torch.Tensor] = {}
    for r in records:
        inv_w = (1.0 / r.weights).to(dtype)
        for name, g in r.grads.items():
            g = g.to(dtype)
            h = (g.T * inv_w) @ g
            out[name] = h if name not in out else out[name] + h
    return {k: v / len(records) for k, v in out.items()}


def influence_function(
    records: Sequence[StepGrads],
    validation: Vectors,
    fit: Sequence[StepGrads],
    damping: float = 0.01,
    dtype: torch.dtype = torch.float64,
) -> list[torch.Tensor]:
    """v^T (H + lambda I)^{-1} g per occurrence of ``records``; H from ``fit`` (e.g. the final epoch)."""
    h = empirical_fisher_matrix(fit, dtype)
    u = {}
    for name, v in validation.items():
        d = h[name].shape[0]
        lam = damping * float(torch.trace(h[name])) / d
        u[name] = torch.linalg.solve(h[name] + lam * torch.eye(d, dtype=dtype), v.to(dtype).T).T  # [V, D]
    return [_dot(r, u, dtype) for r in records]
