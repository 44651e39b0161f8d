"""Rank and linear agreement between estimated and true influence (scipy.stats), in float64."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats


def _flat64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any tensor or array as a flat float64 numpy array."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def pearson(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Pearson correlation of the flattened inputs (same number of elements)."""
    return float(stats.pearsonr(_flat64(a), _flat64(b)).statistic)


def spearman(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Spearman rank correlation of the flattened inputs (ties share their mean rank)."""
    return float(stats.spearmanr(_flat64(a), _flat64(b)).statistic)
