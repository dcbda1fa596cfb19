"""Variance-covariance (VC) feature-diversity regularizer (docs/method.md). Pure torch.

Only the image branch, one view per image, no projector, no invariance term: given the batch of
image embeddings z (B x d) *before* L2 normalisation,

    C = unbiased covariance of z                      (divide by B - 1)
    v = (1/d)       * sum_j  max(0, 1 - sqrt(C_jj + eps))   variance hinge, target std 1
    c = (1/(d(d-1)))* sum_{i!=j} C_ij^2                    mean squared off-diagonal
    vc = a * v + b * c,  a = vc_weight, b = vc_weight * vc_cov_ratio

Distributed training: the statistics are computed on the *global* batch. The caller gathers the
embeddings of all workers with a differentiable all-gather (`regft.distributed.gather_features`)
before calling `vc_loss`, so 2 workers x 64 images give exactly the loss and gradient of 1 worker
x 128 images. That is what the paper's code computed on one GPU: the whole batch's statistics.
(On more than one GPU, under nn.DataParallel, the forward ran on replicas and the VC term it
computed was a constant, without gradient.) Gathering keeps the whole-batch statistics at any
number of workers, instead of the covariance of a 512-d feature over a per-device batch of 16-64
(dominated by noise), so the result does not depend on how many workers a trial happens to get.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-7


@dataclass(frozen=True)
class VCTerms:
    variance: torch.Tensor  # scalar v
    covariance: torch.Tensor  # scalar c
    loss: torch.Tensor  # a * v + b * c


def off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """Flattened off-diagonal elements of a square matrix (d x d -> d*(d-1))."""
    n, m = x.shape
    assert n == m, "off_diagonal needs a square matrix"
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def vc_terms(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (v, c) for embeddings z of shape (B, d), B >= 2. Computed in fp32."""
    if z.dim() != 2:
        raise ValueError(f"vc_terms expects a (batch, dim) tensor, got shape {tuple(z.shape)}")
    b, d = z.shape
    if b < 2:
        raise ValueError(f"vc_terms needs a batch of at least 2 embeddings, got {b}")
    z = z.float()
    z = z - z.mean(dim=0)
    cov = (z.T @ z) / (b - 1)  # (d, d)
    std = torch.sqrt(torch.diagonal(cov) + EPS)  # (d,)
    v = torch.relu(1.0 - std).mean()
    c = off_diagonal(cov).pow(2).sum() / (d * (d - 1)) if d > 1 else cov.new_zeros(())
    return v, c


def vc_loss(z: torch.Tensor, vc_weight: float, vc_cov_ratio: float = 0.125) -> VCTerms:
    """VC regularizer a*v + b*c with a = vc_weight and b = vc_weight * vc_cov_ratio.

    vc_weight = 0 returns a zero loss (still reporting v and c for logging).
    """
    if vc_weight < 0 or vc_cov_ratio < 0:
        raise ValueError(
            f"vc_weight and vc_cov_ratio must be >= 0, got {vc_weight} and {vc_cov_ratio}"
        )
    v, c = vc_terms(z)
    loss = vc_weight * v + (vc_weight * vc_cov_ratio) * c
    return VCTerms(variance=v, covariance=c, loss=loss)
