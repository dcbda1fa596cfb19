"""Zero-shot classification head, pure torch.

Per class: mean of the L2-normalised text embeddings of its descriptions (or of its prompt
templates), re-normalised, times the logit scale; bias 0. The head is applied to L2-normalised
image features, so initial logits are logit_scale * cosine similarity.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def class_embeddings(text_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """text_features[k]: (n_k, d) raw text embeddings of class k -> (C, d) unit-norm class means."""
    if len(text_features) == 0:
        raise ValueError("need at least one class")
    means = []
    for k, feats in enumerate(text_features):
        if feats.dim() != 2 or feats.shape[0] == 0:
            raise ValueError(f"class {k}: expected (n_prompts>0, d) text features, got {tuple(feats.shape)}")
        means.append(F.normalize(feats.float(), dim=-1).mean(dim=0))
    return F.normalize(torch.stack(means), dim=-1)  # (C, d)


class ClassificationHead(nn.Module):
    """logits = W @ normalize(x) + b, with W initialised to logit_scale * class embeddings."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True):
        super().__init__()
        num_classes, dim = weight.shape
        self.normalize = normalize
        self.linear = nn.Linear(dim, num_classes)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias if bias is not None else torch.zeros(num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return self.linear(features)  # (B, d) -> (B, C)


def zeroshot_head(text_features: Sequence[torch.Tensor], logit_scale: float) -> ClassificationHead:
    """Build the zero-shot head from per-class text embeddings and the model's logit scale."""
    return ClassificationHead(class_embeddings(text_features) * float(logit_scale))


class ImageClassifier(nn.Module):
    """CLIP image tower + linear head. features are encode_image outputs before normalisation."""

    def __init__(self, clip_model: nn.Module, head: ClassificationHead):
        super().__init__()
        self.visual = clip_model.visual
        self.head = head

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)  # (B, 3, H, W) -> (B, d), after the visual projection

    def forward(self, images: torch.Tensor, return_features: bool = False):
        z = self.features(images)
        logits = self.head(z)
        return (logits, z) if return_features else logits
