"""The recorded AdamW run as the Adam-aware modes read it from a run directory (dvemb.embed.adam)."""

from __future__ import annotations

import logging

import torch

from dvemb.embed.adam import AdamRun, StoredCoordinates
from dvemb.runtask import model_at
from dvemb.store.gradstore import read_projection
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.store.trajectory import read_steps
from dvemb.types import OptimizerSpec

log = logging.getLogger(__name__)


def is_adamw(run: RunDir) -> bool:
    return run.meta().get("optimizer", {}).get("kind") == "adamw"


def adam_aware(run: RunDir) -> bool:
    """An AdamW run whose store keeps the gradients' own coordinates (unprojected or ``subsample``): the
    Adam-aware recursion applies. An AdamW run under a Gaussian projection falls back to the SGD proxy
    (its elementwise state has no image there; measured in docs/RESULTS.md), with a warning."""
    if not is_adamw(run):
        return False
    specs = read_projection(run.projection)
    if all(s.kind == "subsample" or (s.identity_a and s.identity_s) for s in specs.values()):
        return True
    log.warning(
        "%s: an AdamW run captured with a Gaussian projection is embedded and scored with the SGD proxy; capture with "
        "capture.kind=subsample (the AdamW default) or use score.mode=exact",
        run.root,
    )
    return False


def adam_run(run: RunDir) -> AdamRun:
    """The recorded AdamW: hyper-parameters, per-step per-group LR / decay / clip, boundary states."""
    spec = OptimizerSpec.from_json(run.meta()["optimizer"])
    steps = read_steps(run)
    states = {b: load_tensors(run.optimizer_state(b)) for b in run.boundaries if run.optimizer_state(b).exists()}
    return AdamRun(
        betas=spec.betas,
        eps=spec.eps,
        lr=steps["group_lr"].to_list(),
        weight_decay=steps["group_weight_decay"].to_list(),
        clip=steps["clip_factor"].to_list() if spec.grad_clip is not None else [1.0] * steps.height,
        group_of=spec.group_of,
        states=states,
    )


def stored_coordinates(run: RunDir, dtype: torch.dtype) -> tuple[StoredCoordinates, dict[str, torch.Tensor]]:
    """The run's stored coordinates (its capture's layers and projections) and its parameters by name (their
    shapes give the per-parameter LR, decay and state maps)."""
    model = model_at(run, 0)
    return StoredCoordinates(model, read_projection(run.projection), dtype), dict(model.named_parameters())
