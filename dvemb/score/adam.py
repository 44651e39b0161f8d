"""Stage ``score`` for AdamW runs in embedding / direct mode: the Adam-aware recursion (dvemb.embed.adam)."""

from __future__ import annotations

import polars as pl
import torch

from dvemb.config import RunConfig
from dvemb.embed.adam import AdamRun, StoredCoordinates, adam_direct_scores
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.run import DTYPES
from dvemb.replay.optim import OptimizerSpec
from dvemb.runtask import model_at
from dvemb.store.gradstore import read_projection, read_segment
from dvemb.store.rundir import RunDir, load_tensors
from dvemb.store.trajectory import read_steps


def is_adamw(run: RunDir) -> bool:
    return run.meta().get("optimizer", {}).get("kind") == "adamw"


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


def adam_occurrence_scores(run: RunDir, cfg: RunConfig, checkpoint: int, validation) -> list[torch.Tensor]:
    """Per-step scores [B_t, V] at boundary ``checkpoint`` by the Adam-aware direct recursion."""
    b = run.boundaries
    m = b.index(checkpoint)
    records = [r for j in range(m) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    model = model_at(run, 0)
    params = dict(model.named_parameters())
    coords = StoredCoordinates(model, read_projection(run.projection), DTYPES[cfg.embed.dtype])
    curv = curvature_fn(run, cfg.embed.curvature, range(m))
    return adam_direct_scores(records, adam_run(run), coords, params, validation, curv, cfg.embed.blocks)


def occurrence_frame(records_ids: list[torch.Tensor], scores: list[torch.Tensor], checkpoint: int) -> pl.DataFrame:
    """sample_id, step, score, checkpoint rows (first validation column)."""
    return pl.DataFrame(
        {
            "sample_id": torch.cat(records_ids).numpy(),
            "step": torch.cat([torch.full((len(i),), t) for t, i in enumerate(records_ids)]).numpy(),
            "score": torch.cat([s[:, 0] for s in scores]).to(torch.float64).numpy(),
            "checkpoint": checkpoint,
        },
        schema={"sample_id": pl.Int64, "step": pl.Int64, "score": pl.Float64, "checkpoint": pl.Int64},
    )
