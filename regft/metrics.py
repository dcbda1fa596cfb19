"""Metrics on predictions and feature sets, pure torch.

Feature diversity (docs/method.md asks for two documented scores; these are *ours*, not the paper's
D_Mag / D_Dir, whose formulas were not available):

- `diversity_magnitude`: mean over dimensions of the per-dimension standard deviation of the raw
  (unnormalised) features — how spread out the features are in magnitude.
- `diversity_direction`: mean pairwise cosine distance (1 - cos) between the L2-normalised
  features — how spread out their directions are (0 when all point the same way).
- `effective_rank`: exp of the entropy of the normalised singular values of the centred
  features (Roy & Vetterli 2007) — how many directions the features really use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.numel() == 0:
        return float("nan")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


def diversity_magnitude(features: torch.Tensor) -> float:
    """Mean per-dimension std of (N, d) features (unbiased)."""
    return features.float().std(dim=0, unbiased=True).mean().item()


def diversity_direction(features: torch.Tensor) -> float:
    """Mean pairwise cosine distance over distinct pairs of (N, d) features."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    u = F.normalize(features.float(), dim=-1)
    sims = u @ u.T  # (N, N)
    off = sims.sum() - sims.diagonal().sum()
    return (1.0 - off / (n * (n - 1))).item()


def effective_rank(features: torch.Tensor) -> float:
    """exp(entropy of normalised singular values) of the centred (N, d) features."""
    x = features.float() - features.float().mean(dim=0)
    s = torch.linalg.svdvals(x)
    if s.sum() <= 0:
        return 0.0
    p = s / s.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).item()


def diversity_scores(features: torch.Tensor) -> dict[str, float]:
    return {
        "div_magnitude": diversity_magnitude(features),
        "div_direction": diversity_direction(features),
        "effective_rank": effective_rank(features),
    }
