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
leave-one-out, positive = the occurrence helped) is ``f(theta'_c) - f(theta_c) ≈ -w_{t,z} <c_t, grad l_z>``
(``removal="linear"``). Where the step map is not linear in the gradient (AdamW's normalisation, clipping),
``removal="step"`` takes the removal step itself exactly and only the rest of training to first order::

    score(t, z) = <a_{t+1}, F_t(s_t, g_t - w_{t,z} grad l_z) - F_t(s_t, g_t)>

(each occurrence's gradient by one backward pass, the step map evaluated once per occurrence). Early
AdamW steps, where the second moment is still small, are where the two differ: removing one sample can
flip a coordinate's update, which no derivative sees (docs/RESULTS.md, bench_exact).
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
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dvemb.replay.optim import SEP, OptimizerSpec, Params, State, optimizer_step
from dvemb.replay.trajectory import Trajectory, check_boundary

log = logging.getLogger(__name__)
Removal = Literal["auto", "linear", "step"]
# parameter values per chunk of occurrences in the exact removal step: on a CPU about a cache's worth (larger
# chunks measured 3-5x slower than one occurrence at a time on the MNIST MLP); an accelerator takes the batch
REMOVAL_CHUNK = {"cpu": 1 << 17, "other": 1 << 26}


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
    removal: Removal = "auto",
) -> dict[int, list[torch.Tensor]]:
    """TSLOO of every occurrence for the validation objective at each checkpoint in ``at``: the later steps to
    first order, the removal step itself to first order or exactly (``removal``).

    at: boundary steps (default: the last, T). objective: f(theta) (default: mean validation loss).
    verify: check every forward replay against the next recorded boundary (ReplayError, nothing returned).
    removal: "linear" (first order in the removed weight), "step" (the removal step exact), "auto" (step
    where the step map is not linear in the gradient: AdamW or clipping).
    Returns ``{c: [scores of step t: [B_t] float64, for t < c]}``; positive = the occurrence lowered f(theta_c).
    """
    bounds = traj.boundaries
    at = sorted(at or [bounds[-1]])
    if any(c not in bounds or c == 0 for c in at):
        raise ValueError(f"checkpoints {at} must be segment boundaries after step 0 ({bounds[1:]})")
    f = objective or traj.val_loss
    exact_step = removal_is_step(traj.spec, removal)
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
                adjoints, scores = _reverse_step(traj, t, *states[t - a], adjoints, exact_step)
            states[t - a + 1] = None  # free theta_{t+1}: peak memory stays one segment
            for c, sc in scores.items():
                out[c][t] = sc
            if progress:
                progress(t)
    return out


def _carried(state: State) -> list[str]:
    """The optimizer-state entries the adjoint carries (floating tensors; not Adam's step count)."""
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith(f"{SEP}step")]


def removal_is_step(spec: OptimizerSpec, removal: Removal) -> bool:
    """Whether occurrences are removed by an exact step (see the module docstring)."""
    if removal == "auto":
        return spec.kind == "adamw" or spec.grad_clip is not None
    return removal == "step"


def _reverse_step(
    traj: Trajectory, t: int, params: Params, state: State, adjoints: dict[int, _Adjoint], exact_step: bool = False
) -> tuple[dict[int, _Adjoint], dict[int, torch.Tensor]]:
    """One step of the sweep for every active adjoint: the adjoints a_t and the step's occurrence scores [B]."""
    spec, hyper = traj.spec, traj.steps[t].hyper
    p = {k: v.detach().requires_grad_(k in spec.group_of) for k, v in params.items()}
    w = traj.steps[t].weights.detach().clone().requires_grad_(True)
    trained = traj.trained(p)
    names = list(trained)
    g = torch.autograd.grad(traj.batch_loss(p, t, w), [trained[k] for k in names], create_graph=True)
    scores = _removal_scores(traj, t, p, state, g, adjoints) if exact_step else {}
    # the optimizer's step map on fresh leaves: its VJP gives d/dtheta, d/dstate and c_t = d/dg
    p_leaf = {k: trained[k].detach().requires_grad_(True) for k in names}
    g_leaf = {k: gk.detach().requires_grad_(True) for k, gk in zip(names, g)}
    s_in = _carried(state)
    s_leaf = {k: v.detach().requires_grad_(k in s_in) for k, v in state.items()}
    new_p, new_s = optimizer_step(spec, p_leaf, s_leaf, g_leaf, hyper)
    s_out = [k for k, v in new_s.items() if v.requires_grad]
    ins = [p_leaf[k] for k in names] + [g_leaf[k] for k in names] + [s_leaf[k] for k in s_in]
    n = len(names)
    new_adj = {}
    for c, adj in adjoints.items():
        outs = [new_p[k] for k in names] + [new_s[k] for k in s_out]
        cots = [adj.params[k] for k in names] + [adj.state.get(k, torch.zeros_like(new_s[k])) for k in s_out]
        d = torch.autograd.grad(outs, ins, cots, retain_graph=True, allow_unused=True)
        d = [torch.zeros_like(x) if v is None else v for v, x in zip(d, ins)]
        c_g = d[n : 2 * n]
        # one double-backward pass: d<g, c>/dtheta = H c and d<g, c>/dw_z = <grad l_z, c>
        hc = torch.autograd.grad(g, [trained[k] for k in names] + [w], c_g, retain_graph=True, allow_unused=True)
        new_adj[c] = _Adjoint(
            {k: d[i] + (hc[i] if hc[i] is not None else 0) for i, k in enumerate(names)},
            {k: v for k, v in zip(s_in, d[2 * n :])},
        )
        if not exact_step:
            scores[c] = (-(w.detach() * hc[n])).to(torch.float64).detach()
    return new_adj, scores


def _removal_scores(
    traj: Trajectory, t: int, params: Params, state: State, g: Sequence[torch.Tensor], adjoints: dict[int, _Adjoint]
) -> dict[int, torch.Tensor]:
    """``<a_{t+1}, F_t(s_t, g_t - w_z grad l_z) - F_t(s_t, g_t)>`` for every occurrence z of step t and every
    adjoint: ``{checkpoint: [B] float64}``, computed in the replay's dtype (float32 agrees with float64 to ~2e-6 of
    the largest score on the MNIST MLP, 25 % faster). ``params``: theta_t, the trained ones requiring grad.

    Occurrences go in chunks of about ``REMOVAL_CHUNK`` parameter values, each chunk's per-sample gradients
    from its own rows of the batch (a batched backward pass), the step map vmapped over the chunk: small
    models take the whole batch at once, large ones one sample at a time (memory O(parameters); a plain
    loop there, as vmap's per-op overhead then outweighs batching)."""
    spec, hyper, step = traj.spec, traj.steps[t].hyper, traj.steps[t]
    names = list(traj.trained(params))
    leaves = [params[k] for k in names]
    dt = traj.dtype
    p_t = {k: v.detach().to(dt) for k, v in params.items()}
    s_t = {k: v.detach().to(dt) if v.is_floating_point() else v for k, v in state.items()}
    g_t = {k: gk.detach().to(dt) for k, gk in zip(names, g)}
    adj = [{k: v.to(dt).flatten() for k, v in {**a.params, **a.state}.items()} for a in adjoints.values()]

    def dots(new: dict[str, torch.Tensor]) -> torch.Tensor:  # [adjoints]: <a, new state>
        return torch.stack([sum(torch.vdot(a[k], new[k].flatten()) for k in a if k in new) for a in adj])

    def after(wz: torch.Tensor, *gz: torch.Tensor) -> torch.Tensor:  # one occurrence removed -> [adjoints]
        grads = {k: g_t[k] - wz * gzk.to(dt) for k, gzk in zip(names, gz)}
        new_p, new_s = optimizer_step(spec, p_t, s_t, grads, hyper)
        return dots(new_p | new_s)

    with torch.no_grad():
        new_p, new_s = optimizer_step(spec, p_t, s_t, g_t, hyper)
        base = dots(new_p | new_s)
    b = len(step.weights)
    per_chunk = REMOVAL_CHUNK["cpu" if leaves[0].device.type == "cpu" else "other"]
    chunk = max(1, per_chunk // sum(p_t[k].numel() for k in names))
    w = step.weights.to(dt)
    out = []
    for i in range(0, b, chunk):
        losses = traj.losses(params, {k: v[i : i + chunk] for k, v in step.batch.items()})
        if len(losses) == 1:
            gz = torch.autograd.grad(losses[0], leaves)
            with torch.no_grad():
                out.append(after(w[i], *gz)[None])
        else:
            rows = torch.eye(len(losses), dtype=losses.dtype)
            gz = torch.autograd.grad(losses, leaves, rows, is_grads_batched=True)
            with torch.no_grad():
                out.append(torch.func.vmap(after)(w[i : i + chunk], *gz))
    return dict(zip(adjoints, (torch.cat(out) - base).T.to(torch.float64)))
