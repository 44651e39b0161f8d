"""Per-sample losses: the l_z of DESIGN §2 (cross-entropy; mean over tokens for sequences)."""

import torch
from torch.nn import functional as F


def per_sample_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logits [B, C] or [B, S, C], targets [B] or [B, S] -> [B] losses."""
    if logits.dim() == 3:  # flattened tokens: no transposed copy of the [B, S, C] logits
        b, s, c = logits.shape
        return F.cross_entropy(logits.reshape(b * s, c), y.reshape(b * s), reduction="none").view(b, s).mean(dim=1)
    return F.cross_entropy(logits, y, reduction="none")
