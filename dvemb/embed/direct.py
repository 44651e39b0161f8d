"""Direct (validation-first) scoring: the same scores as embedding mode, without embeddings.

U <- grad l_val(theta_c) (per layer [D, V]); for t = c-1 … 0, with E_t = diag(eta_t) the LR of each
stored coordinate's own param group and c_t = 1 - eta_t (.) lambda_t its decay factor (A_t = D_t - E_t H_t):
    scores_t = G_t P_t E_t U                      ([B, V], summed over layers)
    U <- c_t (.) U - sum_j beta_j f_j (f_j^T P_t E_t U)      (= A_t^T U)
with P_t = I - q q^T at a clipped step (clipping's derivative, dvemb.embed.clipping), else I.
Cost O(B D V) per step instead of O(B D^2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dvemb.embed.blocks import check_blocks, merge_curvature, merge_layers, merge_schedule, merge_step
from dvemb.embed.clipping import clip_direction, project_columns
from dvemb.embed.propagator import Vectors, empirical_fisher, layer_rates
from dvemb.embed.segments import CurvatureFn
from dvemb.types import Schedule, StepGrads


def direct_scores(
    records: Sequence[StepGrads],
    schedule: Schedule,
    validation: Vectors,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    curvature: CurvatureFn | None = None,
    blocks: str = "layer",
) -> list[torch.Tensor]:
    """Per-step scores [B_t, V] for ``records`` (consecutive steps ending right before the checkpoint).

    validation: layer -> [V, D] projected validation gradients at that checkpoint.
    schedule: the LR / decay per step (per layer / coordinate where it carries param groups).
    blocks: "layer" (block-diagonal curvature) or "model" (one block over all layers).
    """
    check_blocks(blocks)
    if blocks == "model":
        schedule = merge_schedule(schedule, {n: v.shape[1] for n, v in validation.items()})
        records, curvature = [merge_step(r) for r in records], merge_curvature(curvature)
        validation = merge_layers(validation)
    groups: dict[int, list[str]] = {}
    for name, v in validation.items():
        groups.setdefault(v.shape[1], []).append(name)

    def stack(vecs: Vectors, names: list[str]) -> torch.Tensor:
        return torch.stack([vecs[n].to(device, dtype) for n in names])  # [L, n, D]

    # U per group of equal-dimension layers: [L, D, V] (a copy: the caller's tensors are never written)
    u = {d: stack(validation, names).transpose(1, 2).contiguous() for d, names in groups.items()}
    out: list[torch.Tensor] = []
    for rec in reversed(records):
        lr, wd = schedule.rates(rec.step, validation)
        uniform = not schedule.per_layer  # scalars: folded into the GEMM, as the score's factor
        curv = curvature(rec) if curvature else empirical_fisher(rec)
        coef = curv.coef.to(device, dtype)[None, :, None]
        clip = clip_direction(rec, schedule.clipped_norm(rec.step), dtype)
        score, eus, decay = None, {}, {}
        for d, names in groups.items():
            if uniform:
                eu = u[d]
            else:
                eta = layer_rates(lr, names, d, device)  # [L, D]
                c = (1.0 - eta * layer_rates(wd, names, d, device)).to(dtype)[:, :, None]
                eu = u[d] * eta.to(dtype)[:, :, None]  # E_t U
            if clip is not None:  # P E_t U: clipping's derivative (dvemb.embed.clipping)
                eu = project_columns(eu, stack({n: clip[n][None] for n in names}, names)[:, 0])
            g = stack(rec.grads, names)
            gu = torch.bmm(g, eu)  # [L, B, V]
            part = gu.sum(0)
            score = part if score is None else score + part
            if curv.product is not None:  # applied to every block at once, below
                eus[d], decay[d] = eu, (1.0 - lr * wd if uniform else c)
                continue
            f, fu = (g, gu) if curvature is None else (stack(curv.vectors, names), None)
            if fu is None:
                fu = torch.bmm(f, eu)
            if uniform:
                u[d].baddbmm_(f.transpose(1, 2), fu * coef, beta=1.0 - lr * wd, alpha=-lr)
            else:
                u[d].mul_(c).baddbmm_(f.transpose(1, 2), fu * coef, alpha=-1.0)
        if curv.product is not None:  # U <- c U - H E U
            heu = curv.product({n: x for d, names in groups.items() for n, x in zip(names, eus[d])})
            for d, names in groups.items():
                h = torch.stack([heu[n] for n in names])
                u[d].mul_(decay[d]).sub_(h, alpha=lr if uniform else 1.0)
        out.append(score * lr if uniform else score)
    out.reverse()
    return out
