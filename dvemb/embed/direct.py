"""Direct (validation-first) scoring: the same scores as embedding mode, without embeddings.

U <- grad l_val(theta_c) (per layer [D, V]); for t = c-1 … 0:
    scores_t = eta_t G_t U                        ([B, V], summed over layers)
    U <- c_t U - eta_t sum_j beta_j f_j (f_j^T U)
Cost O(B D V) per step instead of O(B D^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dvemb.capture.hooks import StepGrads
from dvemb.embed.propagator import Vectors, empirical_fisher
from dvemb.embed.segments import CurvatureFn, Schedule


def direct_scores(
    records: Sequence[StepGrads],
    schedule: Schedule,
    validation: Vectors,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    curvature: CurvatureFn | None = None,
) -> list[torch.Tensor]:
    """Per-step scores [B_t, V] for ``records`` (consecutive steps ending right before the checkpoint).

    validation: layer -> [V, D] projected validation gradients at that checkpoint.
    """
    u = {n: v.to(device, dtype).T.clone() for n, v in validation.items()}  # [D, V], never the caller's memory
    out: list[torch.Tensor] = []
    for rec in reversed(records):
        lr, wd = schedule.at(rec.step)
        curv = curvature(rec) if curvature else empirical_fisher(rec)
        coef = curv.coef.to(device, dtype)
        score = None
        for name, un in u.items():
            g = rec.grads[name].to(device, dtype)
            gu = g @ un
            score = gu if score is None else score + gu
            f, fu = (g, gu) if curvature is None else (curv.vectors[name].to(device, dtype), None)
            if fu is None:
                fu = f @ un
            un.mul_(1.0 - lr * wd).addmm_(f.T, fu * coef[:, None], alpha=-lr)
        out.append(score * lr)
    out.reverse()
    return out
