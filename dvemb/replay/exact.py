"""Exact first-order scores of every occurrence: one reverse sweep through the optimizer as trained.

Write step t as ``s_{t+1} = F_t(s_t, g_t)`` with state s = (theta, optimizer state), the batch
gradient ``g_t = grad_theta sum_z w_{t,z} l_z(theta_t)`` and F the optimizer's step map
(:func:`dvemb.replay.optim.optimizer_step`, clipping included). For a validation objective
``f(theta_c)`` at checkpoint c the adjoint ``a_t = df/ds_t`` runs backwards::

    a_c = (grad f(theta_c), 0)
    (abar, c_t) = VJP of F_t at (s_t, g_t) against a_{t+1}        # c_t: cotangent of g_t, a parameter vector
    a_t = abar + (H_t c_t, 0),   H_t = Hessian of L_t at theta_t   # one Hessian-vector product
    df/dw_{t,z} = <c_t, grad l_z(theta_t)>

Removing occurrence (t, z) sets w_{t,z} to 0, so its score (the first-order trajectory-specific
leave-one-out, positive = the occurrence helped) is ``f(theta'_c) - f(theta_c) ≈ -w_{t,z} <c_t, grad l_z>``.
``H_t c_t`` and every ``<c_t, grad l_z>`` of the batch come from ONE double-backward pass: with the weights
w as a leaf, ``d<g_t, c_t>/dtheta = H_t c_t`` and ``d<g_t, c_t>/dw_z = <grad l_z, c_t>`` — no per-sample
gradient is ever formed, and every parameter of every layer type counts exactly.

Parameters are recomputed segment by segment from the boundary checkpoints (model + optimizer state):
peak memory is one segment's states. Each forward replay is checked against the next recorded boundary
before any score is produced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dvemb.replay.optim import Params, State, optimizer_step
from dvemb.replay.trajectory import Trajectory, check_boundary

log = logging.getLogger(__name__)


@dataclass
class _Adjoint:
    """df/ds_t: parameter part and optimizer-state part (missing state keys = 0)."""

    params: Params
    state: State


def exact_scores(
    traj: Trajectory,
    at: Sequence[int] | None = None,
    objective: Callable[[Params], torch.Tensor] | None = None,
    verify: bool = True,
    progress: Callable[[int], None] | None = None,
) -> dict[int, list[torch.Tensor]]:
    """First-order TSLOO of every occurrence for the validation objective at each checkpoint in ``at``.

    at: boundary steps (default: the last, T). objective: f(theta) (default: mean validation loss).
    verify: check every forward replay against the next recorded boundary (ReplayError, nothing returned).
    Returns ``{c: [scores of step t: [B_t] float64, for t < c]}``; positive = the occurrence lowered f(theta_c).
    """
    bounds = traj.boundaries
    at = sorted(at or [bounds[-1]])
    if any(c not in bounds or c == 0 for c in at):
        raise ValueError(f"checkpoints {at} must be segment boundaries after step 0 ({bounds[1:]})")
    f = objective or traj.val_loss
    out: dict[int, list[torch.Tensor]] = {c: [torch.empty(0)] * c for c in at}
    adjoints: dict[int, _Adjoint] = {}
    for a, b in reversed(list(zip(bounds[:-1], bounds[1:]))):
        if b > at[-1]:
            continue
        states = [(traj.checkpoints[a], traj.opt_states[a])]  # (theta_t, state_t), t = a .. b
        for t in range(a, b):
            states.append(traj.step(*states[-1], t))
        if verify:
            check_boundary(traj, b, *states[-1], scoring=True)
        if b in at:
            p = {k: v.detach().requires_grad_(k in traj.spec.group_of) for k, v in states[-1][0].items()}
            trained = traj.trained(p)
            grad = torch.autograd.grad(f(p), list(trained.values()))
            adjoints[b] = _Adjoint(dict(zip(trained, grad)), {})
        for t in range(b - 1, a - 1, -1):
            with sdpa_kernel([SDPBackend.MATH]):  # the fused attention kernels have no double backward
                adjoints, scores = _reverse_step(traj, t, *states[t - a], adjoints)
            states[t - a + 1] = None  # free theta_{t+1}: peak memory stays one segment
            for c, sc in scores.items():
                out[c][t] = sc
            if progress:
                progress(t)
    return out


def _reverse_step(
    traj: Trajectory, t: int, params: Params, state: State, adjoints: dict[int, _Adjoint]
) -> tuple[dict[int, _Adjoint], dict[int, torch.Tensor]]:
    """One step of the sweep for every active adjoint: the adjoints a_t and the step's occurrence scores [B]."""
    spec, hyper = traj.spec, traj.steps[t].hyper
    p = {k: v.detach().requires_grad_(k in spec.group_of) for k, v in params.items()}
    w = traj.steps[t].weights.detach().clone().requires_grad_(True)
    trained = traj.trained(p)
    names = list(trained)
    g = torch.autograd.grad(traj.batch_loss(p, t, w), [trained[k] for k in names], create_graph=True)
    # the optimizer's step map on fresh leaves: its VJP gives d/dtheta, d/dstate and c_t = d/dg
    p_leaf = {k: trained[k].detach().requires_grad_(True) for k in names}
    g_leaf = {k: gk.detach().requires_grad_(True) for k, gk in zip(names, g)}
    s_in = [k for k, v in state.items() if v.is_floating_point() and not k.endswith("::step")]
    s_leaf = {k: v.detach().requires_grad_(k in s_in) for k, v in state.items()}
    new_p, new_s = optimizer_step(spec, p_leaf, s_leaf, g_leaf, hyper)
    s_out = [k for k, v in new_s.items() if v.requires_grad]
    ins = [p_leaf[k] for k in names] + [g_leaf[k] for k in names] + [s_leaf[k] for k in s_in]
    n = len(names)
    new_adj, scores = {}, {}
    for c, adj in adjoints.items():
        outs = [new_p[k] for k in names] + [new_s[k] for k in s_out]
        cots = [adj.params[k] for k in names] + [adj.state.get(k, torch.zeros_like(new_s[k])) for k in s_out]
        d = torch.autograd.grad(outs, ins, cots, retain_graph=True, allow_unused=True)
        d = [torch.zeros_like(x) if v is None else v for v, x in zip(d, ins)]
        c_g = d[n : 2 * n]
        # one double-backward pass: d<g, c>/dtheta = H c and d<g, c>/dw_z = <grad l_z, c>
        hc = torch.autograd.grad(g, [trained[k] for k in names] + [w], c_g, retain_graph=True, allow_unused=True)
        dots = hc[n]
        new_adj[c] = _Adjoint(
            {k: d[i] + (hc[i] if hc[i] is not None else 0) for i, k in enumerate(names)},
            {k: v for k, v in zip(s_in, d[2 * n :])},
        )
        scores[c] = (-(w.detach() * dots)).to(torch.float64).detach()
    return new_adj, scores
