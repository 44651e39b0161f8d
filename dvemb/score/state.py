"""Stage ``score`` in direct mode for runs whose optimizer has state (AdamW, SGD with momentum): the linearised
state recursion (dvemb.embed.linear_state) over the gradient store, validation-first."""

from __future__ import annotations

import torch

from dvemb.config import RunConfig
from dvemb.embed.curvature import curvature_fn
from dvemb.embed.linear_state import state_direct_scores
from dvemb.embed.recorded_state import state_coefficients
from dvemb.embed.run import DTYPES
from dvemb.store.gradstore import read_segment
from dvemb.store.rundir import RunDir


def state_occurrence_scores(run: RunDir, cfg: RunConfig, checkpoint: int, validation) -> list[torch.Tensor]:
    """Per-step scores [B_t, V] at boundary ``checkpoint`` by the state-aware direct recursion."""
    b = run.boundaries
    m = b.index(checkpoint)
    records = [r for j in range(m) for r in read_segment(run.grads(j), range(b[j], b[j + 1]), kind="grads")]
    dtype = DTYPES[cfg.embed.dtype]
    coef, clip, rho = state_coefficients(run, records, dtype)
    curv = curvature_fn(run, cfg.embed.curvature, range(m))
    return state_direct_scores(records, coef, clip, rho, validation, curv, cfg.embed.blocks, dtype)
