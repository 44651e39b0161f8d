"""Per-sample losses: the l_z of DESIGN §2 (cross-entropy; mean over tokens for sequences)."""

import torch
from torch.nn import functional as F


def per_sample_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """logits [B, C] or [B, S, C], targets [B] or [B, S] -> [B] losses."""
    if logits.dim() == 3:
        return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(dim=1)
    return F.cross_entropy(logits, y, reduction="none")
