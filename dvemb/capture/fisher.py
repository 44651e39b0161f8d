"""Curvature vectors formed while training (the true Fisher / GGN and its Monte-Carlo estimate).

For softmax cross-entropy the true Fisher equals the Gauss-Newton matrix (docs/DESIGN.md §5):

    H_t ≈ sum_z w_z sum_c p_{z,c} grad l_z(c) grad l_z(c)^T

where ``l_z(c)`` is the loss of sample z with label c and ``p_z = softmax(logits_z)``. The curvature
vectors are ``f_{z,c} = grad l_z(c)`` (projected exactly like the training gradients, *not*
multiplied by w) with coefficients ``w_z p_{z,c}`` ("fisher", C vectors per sample), or ``k`` labels
drawn from ``p_z`` with coefficients ``w_z / k`` ("fisher_mc", unbiased). The empirical Fisher
(default) needs nothing extra: f = g, coef = 1/w.

The vectors must be formed at the pre-update parameters theta_t of each step, so they are captured
during training (see :class:`dvemb.capture.callback.GradientLogger`) and stored beside the gradients
in ``grads/curv-seg-XXXX-rank-R.arrow`` (kind "curvature", one row per (sample, label), ``weight`` =
coef). ``grad l_z(c)`` w.r.t. the logits is ``p_z - e_c`` (for a token mean: times m_s / sum(m) at
token s, m the task's mask, all ones without one), so one forward pass and one backward pass per
label (to the tracked layers' outputs only, never into ``.grad``) give the vectors. The logits come
from the task (``task.logits(model, batch)``); a task whose loss is not a cross-entropy of its
logits is refused (TaskError).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from dvemb.capture.hooks import GradientCapture
from dvemb.errors import CaptureError
from dvemb.store.rundir import RunDir
from dvemb.task import Batch, Task
from dvemb.types import StepGrads

CURVATURES = ("empirical", "fisher", "fisher_mc", "hessian")
CAPTURED = ("fisher", "fisher_mc")  # the curvatures whose vectors training captures (hessian: from the replay)
MAX_EXACT_CLASSES = 64  # more classes: use fisher_mc rather than C curvature rows per sample
ROWS_PER_PASS = 64  # labels handled by one (vmapped) backward pass


def curvature_path(run: RunDir, segment: int, rank: int = 0):
    """``grads/curv-seg-XXXX-rank-R.arrow``: the curvature vectors of one segment."""
    return run.root / "grads" / f"curv-seg-{segment:04d}-rank-{rank}.arrow"


def captures_curvature(name: str) -> bool:
    """Whether training captures curvature vectors for ``embed.curvature`` ``name``."""
    return check_curvature(name) in CAPTURED


def check_curvature(name: str) -> str:
    if name not in CURVATURES:
        raise ValueError(f"curvature {name!r}: choose one of {', '.join(CURVATURES)}")
    return name


@contextmanager
def paused(capture: GradientCapture) -> Iterator[None]:
    """Let extra forward/backward passes run without ``capture`` recording them (its state is kept)."""
    state = capture._active, capture._micro
    capture._active, capture._micro = None, {}
    try:
        yield
    finally:
        capture._active, capture._micro = state


def _label_grads(
    logits: torch.Tensor, mode: str, k: int, generator: torch.Generator | None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """d l(label)/d logits for every curvature row, and the per-row factor of the coefficient.

    logits [B, C] or [B, S, C] (mask [B, S]: the tokens the loss averages over; None = all). Returns
    G [R, B, ...logits shape[1:]] (R labels per sample) and factor [B, R] (p_{z,c} for "fisher", 1/k
    for "fisher_mc").
    """
    p = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    n_classes = logits.shape[-1]
    if mode == "fisher":
        if logits.dim() != 2:
            raise CaptureError("curvature 'fisher' (exact) needs [B, C] logits; use 'fisher_mc' for sequences")
        if n_classes > MAX_EXACT_CLASSES:
            raise CaptureError(
                f"curvature 'fisher' with {n_classes} classes needs {n_classes} backward passes per step; "
                "use 'fisher_mc'"
            )
        eye = torch.eye(n_classes, dtype=p.dtype, device=p.device)
        g = p[None, :, :] - eye[:, None, :]  # [C, B, C]: row c is p - e_c
        return g.to(logits.dtype), p.cpu()
    if mode == "fisher_mc":
        if k < 1:
            raise ValueError(f"fisher_samples must be >= 1, got {k}")
        flat = p.reshape(-1, n_classes)
        labels = torch.multinomial(flat.cpu(), k, replacement=True, generator=generator).to(p.device)  # [B*S, k]
        onehot = torch.nn.functional.one_hot(labels.T, n_classes).to(p.dtype)  # [k, B*S, C]
        g = (flat[None] - onehot).reshape(k, *p.shape)
        if logits.dim() == 3:  # l_z is the mean over its (masked) tokens
            m = torch.ones(p.shape[:2], dtype=p.dtype, device=p.device) if mask is None else mask.to(p)
            g = g * (m / m.sum(1, keepdim=True).clamp_min(1.0))[None, :, :, None]
        return g.to(logits.dtype), torch.full((logits.shape[0], k), 1.0 / k, dtype=torch.float64)
    raise ValueError(f"curvature mode {mode!r}: choose 'fisher' or 'fisher_mc'")


def _backward(logits, outputs, chunk, calls, capture) -> dict[str, torch.Tensor]:
    """Projected per-sample vectors for R cotangents ``chunk`` [R, *logits.shape]: layer -> [R, B, D]."""
    r, n = chunk.shape[0], chunk.shape[1]
    try:  # one vmapped backward pass for the whole chunk
        ds = torch.autograd.grad(
            logits, outputs, grad_outputs=chunk, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
    except RuntimeError:  # an op without a batching rule: one backward per row
        per_row = [torch.autograd.grad(logits, outputs, c, retain_graph=True, allow_unused=True) for c in chunk]
        ds = [None if d[0] is None else torch.stack(d) for d in zip(*per_row)]
    out, i = {}, 0
    for name, c in calls.items():
        acc = None
        for a, _ in c:
            d = ds[i]
            i += 1
            if d is None:
                continue
            a_rep = a.unsqueeze(0).expand(r, *a.shape).reshape(r * n, *a.shape[1:])
            g = capture.projectors[name].per_sample(a_rep, d.reshape(r * n, *d.shape[2:])).view(r, n, -1)
            acc = g if acc is None else acc + g
        if acc is None:
            acc = torch.zeros(r, n, capture.specs[name].dim, dtype=capture.dtype, device=logits.device)
        out[name] = acc
    return out


class _Logits(nn.Module):
    """``task.logits(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, task: Task, model: nn.Module) -> None:
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.task.logits(self.model, batch)


def fisher_vectors(
    model: nn.Module,
    capture: GradientCapture,
    batch: Batch | torch.Tensor,
    weights: torch.Tensor | float,
    mode: str = "fisher",
    k: int = 1,
    *,
    task: Task | None = None,
    params: dict[str, torch.Tensor] | None = None,
    sample_ids: torch.Tensor | Sequence[int] | None = None,
    step: int = -1,
    generator: torch.Generator | None = None,
) -> StepGrads:
    """Curvature vectors of one micro-batch, projected with ``capture``'s projections.

    batch: the micro-batch dict (or its inputs ``x`` [B, ...] alone); task: gives the logits and mask
    (default ``Task()``: ``model(batch["x"])``); weights: w_z (scalar or [B]); params: evaluate at these
    parameters (``functional_call``), default the model's own. Returns a StepGrads with one row per
    (sample, label), sample-major: ``grads`` = f_{z,c}, ``weights`` = coef (w_z p_{z,c} or w_z / k).
    Never touches parameter ``.grad``; ``capture`` itself records nothing meanwhile.
    """
    task = task if task is not None else Task()
    task.require_logits(f"curvature {mode!r}")
    batch = {"x": batch} if isinstance(batch, torch.Tensor) else batch
    calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {name: [] for name in capture.tracked}

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            calls[name].append((inputs[0].detach(), output))

        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in capture.hooked]  # tied partners too
    try:
        with paused(capture), torch.enable_grad():
            if params is None:
                logits = task.logits(model, batch)
            else:
                p = {f"model.{key}": v.detach().requires_grad_(True) for key, v in params.items()}
                logits = functional_call(_Logits(task, model), p, (batch,))
    finally:
        for h in handles:
            h.remove()
    n = logits.shape[0]
    ids = torch.arange(n) if sample_ids is None else torch.as_tensor(sample_ids, dtype=torch.int64).cpu()
    w = torch.as_tensor(weights, dtype=torch.float64).cpu().expand(n)
    missing = [name for name, c in calls.items() if not c or not c[0][1].requires_grad]
    if missing:
        raise CaptureError(f"curvature: layers {missing} did not take part in the forward pass with gradients")
    outputs = [o for c in calls.values() for _, o in c]
    label_grads, factor = _label_grads(logits, mode, k, generator, task.mask(batch))
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in calls}
    for lo in range(0, label_grads.shape[0], ROWS_PER_PASS):
        chunk = label_grads[lo : lo + ROWS_PER_PASS]
        for name, g in _backward(logits, outputs, chunk, calls, capture).items():
            rows[name].extend(g.unbind(0))
    n_rows = label_grads.shape[0]
    vectors = {name: torch.stack(v, dim=1).reshape(n * n_rows, -1) for name, v in rows.items()}  # sample-major
    coef = (w[:, None] * factor).reshape(-1)
    return StepGrads(step=step, sample_ids=ids.repeat_interleave(n_rows), weights=coef, grads=vectors)


def concat_records(parts: Sequence[StepGrads], step: int) -> StepGrads:
    """One StepGrads of the rows of several micro-batches."""
    if len(parts) == 1:
        p = parts[0]
        return StepGrads(step, p.sample_ids, p.weights, p.grads)
    return StepGrads(
        step,
        torch.cat([p.sample_ids for p in parts]),
        torch.cat([p.weights for p in parts]),
        {n: torch.cat([p.grads[n] for p in parts]) for n in parts[0].grads},
    )
