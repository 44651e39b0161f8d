"""Records shared by the stages, in one leaf module so that imports point one way
(capture -> store -> embed -> score -> curate; data knows no model).

* :class:`ProjectionConfig` — how per-sample gradients are compressed (sizes, seed, dtype, kind).
* :class:`StepGrads` — the per-sample gradient contributions of one optimizer step.
* :class:`Schedule` — per-step learning rate and weight decay as applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ProjectionConfig:
    """Projection sizes per layer side; ``k >= d`` (or None) means exact (identity).

    kind: ``kronecker`` (k_s x k_a matrix) or ``elementwise`` (a k_a * k_s tensor sketch; both k needed).
    """

    k_a: int | None = 32
    k_s: int | None = 32
    seed: int = 0
    dtype: str = "float32"
    kind: str = "kronecker"

    @classmethod
    def of(cls, capture) -> ProjectionConfig:
        """From a run config's ``capture`` section (dvemb.config.CaptureConfig)."""
        return cls(capture.k_a, capture.k_s, capture.seed, capture.dtype, capture.kind)


@dataclass
class StepGrads:
    """The per-sample gradient contributions of one optimizer step (rows = occurrences)."""

    step: int
    sample_ids: torch.Tensor  # [B] int64
    weights: torch.Tensor  # [B] float64, coefficient of each sample's loss in L_t
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [B, D_layer]


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate actually applied and coupled weight decay, indexed by step."""

    lr: Sequence[float]
    weight_decay: Sequence[float]

    def at(self, step: int) -> tuple[float, float]:
        if not 0 <= step < len(self.lr):
            raise IndexError(f"step {step}: the schedule covers steps 0..{len(self.lr) - 1}")
        return float(self.lr[step]), float(self.weight_decay[step])
