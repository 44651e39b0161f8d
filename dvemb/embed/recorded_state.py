"""The recorded optimizer as the state-aware modes read it from a run directory: AdamW (dvemb.embed.adam) and SGD
with momentum (dvemb.embed.momentum), both in the linear-state form of dvemb.embed.linear_state."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from dvemb.embed.adam import AdamRun, StoredCoordinates, adam_coefficients, adam_step_coefficients
from dvemb.embed.clipping import with_clip_directions
from dvemb.embed.linear_state import StepCoef, sampling_ratio
from dvemb.embed.momentum import MomentumRun, momentum_coefficients
from dvemb.runtask import model_at
from dvemb.store.gradstore import read_projection
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.store.trajectory import read_steps, stored_groups, was_skipped
from dvemb.types import OptimizerSpec, StepGrads, clipped_norms

log = logging.getLogger(__name__)


def optimizer_spec(run: RunDir) -> OptimizerSpec | None:
    """The run's recorded optimizer (None for a run recorded without one)."""
    meta = run.meta().get("optimizer")
    return OptimizerSpec.from_json(meta) if meta else None


def adam_aware(run: RunDir) -> bool:
    """An AdamW run whose store keeps the gradients' own coordinates (unprojected, ``rowwise``, ``subsample``): the
    Adam-aware recursion applies. An AdamW run under a Gaussian projection falls back to the SGD proxy
    (its elementwise state has no image there; measured in docs/RESULTS.md), with a warning."""
    spec = optimizer_spec(run)
    if spec is None or spec.kind != "adamw":
        return False
    specs = read_projection(run.projection)
    if all(s.own_coordinates for s in specs.values()):
        return True
    log.warning(
        "%s: an AdamW run captured with a Gaussian projection is embedded and scored with the SGD proxy; capture "
        "with capture.kind=rowwise (the AdamW default) or use score.mode=exact",
        run.root,
    )
    return False


def state_kind(run: RunDir) -> str | None:
    """``adamw`` or ``momentum`` when the embedding / direct modes follow the optimizer's state (theta, m[, v]);
    None for plain SGD (the SGD recursion) and the SGD proxy of a Gaussian AdamW store (warned)."""
    if adam_aware(run):
        return "adamw"
    spec = optimizer_spec(run)
    return "momentum" if spec is not None and spec.kind == "sgd" and spec.momentum != 0 else None


def curvature_advice(run: RunDir, curvature: str, blocks: str) -> str | None:
    """A warning for a run whose optimizer has state scored with the empirical Fisher or per-layer blocks: on the
    digits AdamW and momentum runs that ranks far below the GGN over the whole model (docs/RESULTS.md,
    bench_exact: last epoch 0.61 / 0.63 against 0.96 / 0.98 for AdamW, 0.44 against 0.93 for momentum)."""
    kind = state_kind(run)
    if kind is None or (curvature != "empirical" and blocks == "model"):
        return None
    return (
        f"{run.root}: a {kind} run scored with embed.curvature={curvature}, embed.blocks={blocks}; the "
        f"{kind}-aware recursion was measured far more faithful with embed.curvature=hessian (the exact Hessian, "
        "from the replayed run) or fisher (GGN vectors, captured in training; fisher_mc for large label sets) and "
        "embed.blocks=model (docs/RESULTS.md), or use score.mode=exact"
    )


def adam_run(run: RunDir) -> AdamRun:
    """The recorded AdamW: hyper-parameters, per-step per-group LR / decay / clip, boundary states."""
    spec = optimizer_spec(run)
    steps = read_steps(run)
    states = {b: load_tensors(run.optimizer_state(b)) for b in run.boundaries if run.optimizer_state(b).exists()}
    return AdamRun(
        betas=spec.betas,
        eps=spec.eps,
        lr=steps["group_lr"].to_list(),
        weight_decay=steps["group_weight_decay"].to_list(),
        clip=clip_factors(run, spec),
        group_of=spec.group_of,
        states=states,
    )


def clip_factors(run: RunDir, spec: OptimizerSpec) -> list[float]:
    steps = read_steps(run)
    return steps["clip_factor"].to_list() if spec.grad_clip is not None else [1.0] * steps.height


def momentum_run(run: RunDir) -> MomentumRun:
    """The recorded SGD with momentum: hyper-parameters, per-step per-group LR / decay / clip / skipped, and
    the param group of each stored coordinate."""
    spec = optimizer_spec(run)
    steps = read_steps(run)
    clip = clip_factors(run, spec)
    glr = steps["group_lr"].to_list()
    specs = read_projection(run.projection)
    return MomentumRun(
        momentum=spec.momentum,
        dampening=spec.dampening,
        nesterov=spec.nesterov,
        lr=glr,
        weight_decay=steps["group_weight_decay"].to_list(),
        clip=clip,
        skipped=[was_skipped(lr, g, c) for lr, g, c in zip(steps["lr"].to_list(), glr, clip)],
        layer_groups={n: stored_groups(n, s, spec.group_of, frozen=len(spec.groups)) for n, s in specs.items()},
    )


def stored_coordinates(run: RunDir, dtype: torch.dtype) -> tuple[StoredCoordinates, dict[str, torch.Tensor]]:
    """The run's stored coordinates (its capture's layers and projections) and its parameters by name (their
    shapes give the per-parameter LR, decay and state maps)."""
    model = model_at(run, 0)
    return StoredCoordinates(model, read_projection(run.projection), dtype), dict(model.named_parameters())


def state_coefficients(
    run: RunDir, records: Sequence[StepGrads], dtype: torch.dtype
) -> tuple[list[StepCoef], list[float], dict[str, torch.Tensor]]:
    """For consecutive ``records`` from a boundary of a run with :func:`state_kind`: each step's linear-state
    coefficients (with clipping's direction ``q`` at clipped steps, dvemb.embed.clipping), its clip factor, and each
    layer's sampling ratios ([D])."""
    spec = optimizer_spec(run)
    if state_kind(run) == "adamw":
        adam = adam_run(run)
        coords, params = stored_coordinates(run, dtype)
        coef = adam_step_coefficients(adam_coefficients(records, adam, coords, params), adam.betas)
        clip, rho = [float(adam.clip[r.step]) for r in records], coords.rho()
    else:
        mom = momentum_run(run)
        specs = read_projection(run.projection)
        dims = {n: s.dim for n, s in specs.items()}
        rho = {n: torch.full((s.dim,), sampling_ratio(s), dtype=torch.float64) for n, s in specs.items()}
        coef, clip = momentum_coefficients(records, mom, dims), [float(mom.clip[r.step]) for r in records]
    with_clip_directions(coef, records, dict(zip((r.step for r in records), clipped_norms(clip, spec.grad_clip))))
    return coef, clip, rho
