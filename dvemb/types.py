"""Records shared by the stages, in one leaf module so that imports point one way
(capture -> store -> embed -> score -> curate; data knows no model).

* :class:`ProjectionConfig` — how per-sample gradients are compressed (sizes, seed, dtype, kind).
* :class:`StepGrads` — the per-sample gradient contributions of one optimizer step.
* :class:`Schedule` — per-step learning rate and weight decay as applied (optionally per param group).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
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


Rate = float | torch.Tensor  # one value for a whole layer, or one per stored coordinate ([D] float64)


@dataclass(frozen=True)
class Schedule:
    """Per-step learning rate actually applied and coupled weight decay, indexed by step.

    A parameter's step is ``theta' = (1 - lr * wd) theta - lr * g`` (the clip factor folded into ``lr``).
    ``lr`` / ``weight_decay``: one value per step (the first param group's). Optional per-group extension
    (e.g. nanoGPT's decay / no-decay groups with their own LR): ``group_lr[t][i]`` /
    ``group_weight_decay[t][i]`` in the same convention for param group i, and ``layer_groups``: layer ->
    the group of its stored coordinates, an int (the whole layer) or a [D] int64 tensor (one group per
    stored coordinate, e.g. a weight that decays and a bias that does not). A layer without an entry
    follows ``lr`` / ``weight_decay``.
    """

    lr: Sequence[float]
    weight_decay: Sequence[float]
    group_lr: Sequence[Sequence[float]] | None = None
    group_weight_decay: Sequence[Sequence[float]] | None = None
    layer_groups: Mapping[str, int | torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.group_lr is None) != (self.group_weight_decay is None):
            raise ValueError("Schedule: group_lr and group_weight_decay come together")
        if self.group_lr is not None and not len(self.group_lr) == len(self.group_weight_decay) == len(self.lr):
            raise ValueError(
                f"Schedule: {len(self.lr)} steps but group_lr / group_weight_decay cover "
                f"{len(self.group_lr)} / {len(self.group_weight_decay)}"
            )
        if self.layer_groups and self.group_lr is None:
            raise ValueError("Schedule: layer_groups needs group_lr and group_weight_decay")

    @property
    def per_layer(self) -> bool:
        """True when some layer follows its own param groups."""
        return self.group_lr is not None and bool(self.layer_groups)

    def at(self, step: int) -> tuple[float, float]:
        if not 0 <= step < len(self.lr):
            raise IndexError(f"step {step}: the schedule covers steps 0..{len(self.lr) - 1}")
        return float(self.lr[step]), float(self.weight_decay[step])

    def layer_at(self, step: int, layer: str) -> tuple[Rate, Rate]:
        """(lr, weight decay) of ``layer``'s own parameters at ``step``: floats, or [D] float64 per coordinate."""
        lr, wd = self.at(step)
        group = self.layer_groups.get(layer)
        if group is None or self.group_lr is None:
            return lr, wd
        glr, gwd = self.group_lr[step], self.group_weight_decay[step]
        if isinstance(group, int):
            return float(glr[group]), float(gwd[group])
        idx = group.to(torch.int64)
        return torch.tensor(glr, dtype=torch.float64)[idx], torch.tensor(gwd, dtype=torch.float64)[idx]

    def rates(self, step: int, layers: Iterable[str]) -> tuple[Rate | dict[str, Rate], Rate | dict[str, Rate]]:
        """(lr, weight decay) at ``step`` for the recursion: two floats without per-layer groups, else two
        mappings layer -> :meth:`layer_at`."""
        if not self.per_layer:
            return self.at(step)
        both = {n: self.layer_at(step, n) for n in layers}
        return {n: v[0] for n, v in both.items()}, {n: v[1] for n, v in both.items()}
