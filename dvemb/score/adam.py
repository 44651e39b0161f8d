"""Stage ``score`` for AdamW runs in direct mode: the Adam-aware recursion (dvemb.embed.adam) over the store."""

from __future__ import annotations

import torch

from dvemb.config import RunConfig
from dvemb.embed.adam import adam_direct_scores
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.recorded_adam import adam_run, stored_coordinates
from dvemb.embed.run import DTYPES
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir


def adam_occurrence_scores(run: RunDir, cfg: RunConfig, checkpoint: int, validation) -> list[torch.Tensor]:
    """Per-step scores [B_t, V] at boundary ``checkpoint`` by the Adam-aware direct recursion."""
    b = run.boundaries
    m = b.index(checkpoint)
    records = [r for j in range(m) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    coords, params = stored_coordinates(run, DTYPES[cfg.embed.dtype])
    curv = curvature_fn(run, cfg.embed.curvature, range(m))
    return adam_direct_scores(records, adam_run(run), coords, params, validation, curv, cfg.embed.blocks)
