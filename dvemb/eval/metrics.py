"""Rank and linear agreement between estimated and true influence."""

import torch


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean rank), 0-based, float64."""
    x = x.to(torch.float64).flatten()
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=torch.float64)
    uniq, inv = torch.unique(x, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    return (sums / counts)[inv]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64).flatten(), b.to(torch.float64).flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    return pearson(_ranks(a), _ranks(b))
