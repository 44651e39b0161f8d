"""A plain multi-layer perceptron: [B, d_in] -> [B, n_classes] logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


@dataclass(frozen=True)
class MLPConfig:
    d_in: int = 64
    hidden: tuple[int, ...] = (32,)
    n_classes: int = 10
    activation: str = "tanh"


class MLP(nn.Module):
    """Linear layers named ``layers.0``, ``layers.2``, … with an activation between them."""

    def __init__(self, cfg: MLPConfig):
        super().__init__()
        widths = [cfg.d_in, *cfg.hidden, cfg.n_classes]
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            mods.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                mods.append(ACTIVATIONS[cfg.activation]())
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
