"""Stage ``score`` in exact mode: every occurrence's first-order TSLOO from one reverse sweep (dvemb.replay)."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl
import torch

from dvemb.config import RunConfig
from dvemb.errors import DvembError
from dvemb.replay.exact import exact_scores, removal_is_step
from dvemb.replay.trajectory import load_trajectory
from dvemb.store.rundir import RunDir

log = logging.getLogger(__name__)


def exact_occurrences(run: RunDir, cfg: RunConfig, val: Path | None = None) -> pl.DataFrame:
    """sample_id, step, score, checkpoint for every occurrence, at the final boundary (and every
    intermediate one when ``score.checkpoints``); positive = the occurrence lowered the loss on the validation
    table ``val`` (default: the run's own)."""
    traj = load_trajectory(run, fp64=cfg.score.replay_dtype == "float64", val=val)
    bounds = traj.boundaries
    at = bounds[1:] if cfg.score.checkpoints else [bounds[-1]]
    log.info(
        "exact scores: reverse sweep over %d steps, %d segment(s), checkpoints %s, %s removal",
        traj.num_steps,
        len(bounds) - 1,
        at,
        "exact-step" if removal_is_step(traj.spec, cfg.score.removal) else "first-order",
    )
    scores = exact_scores(traj, at, removal=cfg.score.removal)
    frames = []
    for c in at:
        s = torch.cat(scores[c])
        if not bool(torch.isfinite(s).all()):
            t = next(t for t, st in enumerate(scores[c]) if not bool(torch.isfinite(st).all()))
            raise DvembError(f"exact scores at checkpoint {c}: non-finite value at step {t} (training diverged?)")
        frames.append(
            pl.DataFrame(
                {
                    "sample_id": torch.cat([traj.steps[t].sample_ids for t in range(c)]).numpy(),
                    "step": torch.cat([torch.full((len(traj.steps[t].sample_ids),), t) for t in range(c)]).numpy(),
                    "score": s.numpy(),
                    "checkpoint": c,
                },
                schema={"sample_id": pl.Int64, "step": pl.Int64, "score": pl.Float64, "checkpoint": pl.Int64},
            )
        )
    return pl.concat(frames)
