"""The optimizer as trained, as an explicit differentiable step map.

``optimizer_step(spec, params, state, grads, hyper)`` performs one step of ``torch.optim.SGD``
(momentum, dampening, Nesterov, coupled weight decay) or ``torch.optim.AdamW`` (β1, β2, ε, decoupled
decay, bias correction) with the same arithmetic as torch's single-tensor (CPU) implementation,
global-norm gradient clipping (``torch.nn.utils.clip_grad_norm_``) folded in, and per-group LR and
weight decay. It is built from differentiable tensor ops only, so ``torch.autograd`` / ``torch.func``
give its vector-Jacobian products (the exact replay scorer) and ``vmap`` runs it over many lanes (the
ground truth). tests/test_replay.py checks it against ``torch.optim`` to 1e-12 in float64.

The optimizer state is a flat dict keyed ``"{parameter name}::{state key}"`` — ``momentum_buffer``
(SGD), ``exp_avg``, ``exp_avg_sq``, ``step`` (AdamW) — the layout of
``checkpoints/optimizer-XXXXXX.safetensors``. A missing key means "no state yet" (step 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from dvemb.errors import ReplayError  # noqa: F401  (raised by the replay; imported from here by callers)
from dvemb.types import CLIP_EPS, SEP, OptimizerSpec, StepHyper, torch_state  # noqa: F401  (the step map's records)

Params = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not NaN) derivative where v == 0 (Adam coordinates that never saw a gradient)."""
    if not (torch.is_grad_enabled() and v.requires_grad):  # no derivative asked for: the same values, cheaper
        return torch.sqrt(v)
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def clip_coefficient(grads: Mapping[str, torch.Tensor], max_norm: float) -> torch.Tensor:
    """min(1, max_norm / (||g||_2 + 1e-6)) over all gradients, as clip_grad_norm_ computes it."""
    norms = torch.stack([torch.linalg.vector_norm(g) for g in grads.values()])
    total = torch.linalg.vector_norm(norms)
    return torch.clamp(max_norm / (total + CLIP_EPS), max=1.0)


def optimizer_step(
    spec: OptimizerSpec, params: Params, state: State, grads: Params, hyper: StepHyper
) -> tuple[Params, State]:
    """One optimizer step: (theta_t, state_t, g_t) -> (theta_{t+1}, state_{t+1}); g_t = grad of the batch loss.

    Pure: nothing is modified in place. Parameters without a gradient entry are left unchanged.
    """
    if spec.grad_clip is not None:
        coef = clip_coefficient(grads, spec.grad_clip)
        grads = {k: g * coef for k, g in grads.items()}
    new_p, new_s = dict(params), dict(state)
    for name, g in grads.items():
        i = spec.group_of[name]
        lr, wd = hyper.lr[i], hyper.weight_decay[i]
        p = params[name]
        if spec.kind == "adamw":
            new_p[name], st = _adamw(spec, p, g, state, name, lr, wd)
        else:
            new_p[name], st = _sgd(spec, p, g, state, name, lr, wd)
        new_s.update(st)
    return new_p, new_s


def _sgd(spec: OptimizerSpec, p, g, state: State, name: str, lr: float, wd: float):
    if wd != 0:
        g = g + wd * p
    st = {}
    if spec.momentum != 0:
        key = f"{name}{SEP}momentum_buffer"
        buf = state.get(key)
        buf = g if buf is None else spec.momentum * buf + (1 - spec.dampening) * g
        st[key] = buf
        g = g + spec.momentum * buf if spec.nesterov else buf
    return p - lr * g, st


def _adamw(spec: OptimizerSpec, p, g, state: State, name: str, lr: float, wd: float):
    b1, b2 = spec.betas
    k_m, k_v, k_t = (f"{name}{SEP}{k}" for k in ("exp_avg", "exp_avg_sq", "step"))
    m, v = state.get(k_m), state.get(k_v)
    m = torch.zeros_like(p) if m is None else m
    v = torch.zeros_like(p) if v is None else v
    step_t = state.get(k_t)
    step = (float(step_t) if step_t is not None else 0.0) + 1.0
    p = p * (1 - lr * wd)
    m = m + (1 - b1) * (g - m)  # exp_avg.lerp_(grad, 1 - beta1)
    v = v * b2 + (1 - b2) * g * g
    bc1 = 1 - b1**step
    bc2_sqrt = math.sqrt(1 - b2**step)
    denom = _safe_sqrt(v) / bc2_sqrt + spec.eps
    p = p - (lr / bc1) * (m / denom)
    step_out = torch.full((), step, dtype=torch.float64) if step_t is None else step_t.new_full((), step)
    return p, {k_m: m, k_v: v, k_t: step_out}
