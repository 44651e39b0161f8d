"""Momentum-aware scores: SGD with momentum (dampening, Nesterov, coupled decay) linearised, state (theta, b).

torch's SGD step: ``d = g + lam theta``; ``b' = d`` on the buffer's first step, else ``b' = mu b + (1 - tau) d``;
``theta' = theta - lr b'`` (Nesterov: ``theta' = theta - lr (d + mu b')``). The map is linear in (theta, b) given
the gradient, so its linearisation has coefficients that depend on the recorded hyper-parameters only — no
recorded state, and any store (a Gaussian projection too: every coefficient is a per-coordinate constant of
its param group). In the form of dvemb.embed.linear_state: ``b1 = mu`` (0 on the first step), ``k1 = 1 - tau``
(1 on the first step), ``P = lr`` (Nesterov ``lr mu``), ``a = P k1`` (Nesterov ``+ lr``), ``lam`` the decay,
``decay = 1``. A step whose update was skipped (AMP overflow) is the identity and pushes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dvemb.embed.linear_state import StepCoef
from dvemb.types import StepGrads


@dataclass(frozen=True)
class MomentumRun:
    """The recorded SGD: momentum, dampening, nesterov; per step: each param group's LR and coupled decay as
    set (before clipping), the clip factor and whether the update was skipped; per layer: the param group of
    its stored coordinates (an int, or [D] int64; a group index past the last is a frozen parameter)."""

    momentum: float
    dampening: float
    nesterov: bool
    lr: Sequence[Sequence[float]]
    weight_decay: Sequence[Sequence[float]]
    clip: Sequence[float]
    skipped: Sequence[bool]
    layer_groups: Mapping[str, int | torch.Tensor]


def momentum_coefficients(records: Sequence[StepGrads], run: MomentumRun, dims: Mapping[str, int]) -> list[StepCoef]:
    """Per record, per layer: the linear-state coefficients ([D] float64 each) of its step."""
    first = next((t for t, s in enumerate(run.skipped) if not s), None)  # the buffer's first step
    mu, tau = run.momentum, run.dampening
    out = []
    for rec in records:
        t = rec.step
        per_group = (
            torch.tensor([*run.lr[t], 0.0], dtype=torch.float64),
            torch.tensor([*run.weight_decay[t], 0.0], dtype=torch.float64),
        )
        step = {}
        for n, d in dims.items():
            g = run.layer_groups.get(n, 0)
            idx = torch.full((d,), g, dtype=torch.int64) if isinstance(g, int) else g.to(torch.int64)
            idx = idx.clamp_max(len(run.lr[t]))  # frozen parameters: LR and decay 0
            lr, lam = per_group[0][idx], per_group[1][idx]
            one, zero = torch.ones(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
            if run.skipped[t]:
                step[n] = {"b1": one, "k1": zero, "P": zero, "a": zero, "lam": zero, "decay": one}
                continue
            b1, k1 = (0.0, 1.0) if t == first else (mu, 1 - tau)
            p = lr * mu if run.nesterov else lr
            a = p * k1 + (lr if run.nesterov else 0.0)
            step[n] = {"b1": b1 * one, "k1": k1 * one, "P": p, "a": a, "lam": lam, "decay": one}
        out.append(step)
    return out
