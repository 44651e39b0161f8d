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

(per-sample gradients in one vmapped pass per chunk, the step map over all of a chunk's occurrences). Early
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
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dvemb.replay.optim import CLIP_EPS, SEP, OptimizerSpec, Params, State, clip_coefficient, optimizer_step
from dvemb.replay.trajectory import Trajectory, check_boundary

log = logging.getLogger(__name__)
Removal = Literal["auto", "linear", "step"]
CurvatureProduct = Callable[[Params, int, Params], Sequence[torch.Tensor]]  # (theta_t, t, c) -> H_t c per parameter
# the exact removal step, in values: per-sample gradients held at once ([occurrences, parameters]; memory), and
# one block of the elementwise step map ([occurrences, coordinates]): on a CPU about a cache's worth (the step
# map is memory-bound; on the MNIST MLP 2^17 beat 2^15 and 2^19 by 1.2-1.5x); an accelerator takes large ones
REMOVAL_CHUNK = {"cpu": 1 << 24, "other": 1 << 28}
REMOVAL_BLOCK = {"cpu": 1 << 17, "other": 1 << 26}


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
    curvature: CurvatureProduct | None = None,
) -> dict[int, list[torch.Tensor]]:
    """TSLOO of every occurrence for the validation objective at each checkpoint in ``at``: the later steps to
    first order, the removal step itself to first order or exactly (``removal``).

    at: boundary steps (default: the last, T). objective: f(theta) (default: mean validation loss).
    verify: check every forward replay against the next recorded boundary (ReplayError, nothing returned).
    removal: "linear" (first order in the removed weight), "step" (the removal step exact), "auto" (step
    where the step map is not linear in the gradient: AdamW or clipping).
    curvature: ``(params, t, c) -> H_t c`` replacing the exact Hessian-vector product (a diagnostic: e.g. a
    Gauss-Newton product, to measure what a curvature model costs; None = exact).
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
                adjoints, scores = _reverse_step(traj, t, *states[t - a], adjoints, exact_step, curvature)
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
    traj: Trajectory,
    t: int,
    params: Params,
    state: State,
    adjoints: dict[int, _Adjoint],
    exact_step: bool = False,
    curvature: CurvatureProduct | None = None,
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
        if curvature is not None:
            hc = [*curvature(p, t, dict(zip(names, c_g))), hc[n]]
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
    adjoint: ``{checkpoint: [B] float64}``, computed in the replay's dtype (float32 agrees with float64 to ~3e-6 of
    the largest score on the MNIST MLP). ``params``: theta_t, the trained ones requiring grad.

    Occurrences go in chunks of about ``REMOVAL_CHUNK`` per-sample gradient values ([occurrences, parameters],
    one batched pass each, :func:`_per_sample_grads`). The step map then runs over blocks of about
    ``REMOVAL_BLOCK`` values ([occurrences, coordinates of one parameter]): it is elementwise, so each block is
    one ``optimizer_step`` call, and the score accumulates ``<a, new - base>`` block by block (differences, not
    two large sums). With clipping, each occurrence's clip factor comes from its own gradient's norm first."""
    spec, hyper, step = traj.spec, traj.steps[t].hyper, traj.steps[t]
    names = list(traj.trained(params))
    dt = traj.dtype
    carried = set(_carried(state))
    p_t = {k: params[k].detach().to(dt).flatten() for k in names}
    g_t = {k: gk.detach().to(dt).flatten() for k, gk in zip(names, g)}
    s_t = {k: v.detach().to(dt).flatten() if k in carried else v for k, v in state.items()}
    adj = [{k: v.detach().to(dt).flatten() for k, v in {**a.params, **a.state}.items()} for a in adjoints.values()]
    plain = replace(spec, grad_clip=None)  # the clip factor is folded into the gradients given to it
    with torch.no_grad():
        clip_t = clip_coefficient(g_t, spec.grad_clip) if spec.grad_clip is not None else 1.0
        base = optimizer_step(plain, p_t, s_t, {k: clip_t * x for k, x in g_t.items()}, hyper)
    where = "cpu" if p_t[names[0]].device.type == "cpu" else "other"
    chunk = max(1, REMOVAL_CHUNK[where] // sum(x.numel() for x in p_t.values()))
    w = step.weights.to(dt)
    out = []
    for i in range(0, len(w), chunk):
        gz = _per_sample_grads(traj, params, names, {k: v[i : i + chunk] for k, v in step.batch.items()})
        with torch.no_grad():
            wz = w[i : i + chunk, None]
            gz = {k: x.to(dt).reshape(len(wz), -1) for k, x in gz.items()}
            size = max(1, REMOVAL_BLOCK[where] // len(wz))
            blocks = [(k, slice(s, s + size)) for k in names for s in range(0, p_t[k].numel(), size)]
            clip = 1.0
            if spec.grad_clip is not None:
                sq = sum(((g_t[k][sl] - wz * gz[k][:, sl]) ** 2).sum(-1) for k, sl in blocks)
                clip = torch.clamp(spec.grad_clip / (sq.sqrt() + CLIP_EPS), max=1.0)[:, None]
            acc = torch.zeros(len(wz), len(adj), dtype=dt, device=w.device)
            for k, sl in blocks:
                grads = {k: clip * (g_t[k][sl] - wz * gz[k][:, sl])}
                states = {key: v[sl] if key in carried else v for key, v in s_t.items() if key.startswith(k + SEP)}
                new_p, new_s = optimizer_step(plain, {k: p_t[k][sl]}, states, grads, hyper)
                for key, new in [(k, new_p[k]), *((key, v) for key, v in new_s.items() if v.shape == new_p[k].shape)]:
                    old = base[0][key] if key == k else base[1][key]
                    a = torch.stack([x[key][sl] if key in x else torch.zeros_like(old[sl]) for x in adj], 1)
                    acc += (new - old[sl]) @ a
            out.append(acc)
    return dict(zip(adjoints, torch.cat(out).T.to(torch.float64)))


def _per_sample_grads(traj: Trajectory, params: Params, names: list[str], rows: dict) -> dict[str, torch.Tensor]:
    """Gradients of each row's loss: parameter -> [rows, *shape]. One vmapped pass (``torch.func``); a model
    that torch.func cannot vmap falls back to one batched backward pass (autograd's ``is_grads_batched``)."""
    fixed = {k: v.detach() for k, v in params.items() if k not in names}

    def loss(trained: Params, row: dict) -> torch.Tensor:
        return traj.losses(fixed | trained, {k: v.unsqueeze(0) for k, v in row.items()}).sum()

    try:
        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))({k: params[k].detach() for k in names}, rows)
    except (RuntimeError, NotImplementedError) as e:
        log.debug("per-sample gradients without torch.func (%s)", e)
    losses = traj.losses(params, rows)
    leaves = [params[k] for k in names]
    if len(losses) == 1:
        return {k: x[None] for k, x in zip(names, torch.autograd.grad(losses[0], leaves))}
    rows_eye = torch.eye(len(losses), dtype=losses.dtype, device=losses.device)
    return dict(zip(names, torch.autograd.grad(losses, leaves, rows_eye, is_grads_batched=True)))
