import math

import pytest
import torch
import torch.nn.functional as F

from regft.metrics import accuracy, diversity_direction, diversity_magnitude, effective_rank
from regft.zeroshot import class_embeddings, zeroshot_head


def test_head_rows_are_renormalised_class_means_times_scale():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(n, 8, generator=g) * 3 for n in (1, 4, 7)]
    head = zeroshot_head(feats, logit_scale=100.0)
    w = head.linear.weight.detach()
    assert w.shape == (3, 8)
    torch.testing.assert_close(w.norm(dim=1), torch.full((3,), 100.0))
    for k, f in enumerate(feats):  # independent reference: mean of unit vectors, renormalised
        ref = F.normalize(torch.stack([x / x.norm() for x in f]).mean(0), dim=0) * 100
        torch.testing.assert_close(w[k], ref, rtol=1e-5, atol=1e-4)
    assert torch.count_nonzero(head.linear.bias) == 0


def test_head_logits_are_scaled_cosines():
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(3, 8, generator=g) for _ in range(4)]
    head = zeroshot_head(feats, 50.0)
    x = torch.randn(5, 8, generator=g) * 7  # unnormalised image features
    cos = F.normalize(x, dim=-1) @ class_embeddings(feats).T
    torch.testing.assert_close(head(x), 50.0 * cos, rtol=1e-5, atol=1e-4)


def test_class_embeddings_rejects_empty_class():
    with pytest.raises(ValueError, match="class 1"):
        class_embeddings([torch.randn(2, 4), torch.randn(0, 4)])


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


def test_diversity_scores_on_known_sets():
    g = torch.Generator().manual_seed(2)
    same = torch.ones(10, 4) * 3
    assert diversity_magnitude(same) == 0.0
    assert diversity_direction(same) == pytest.approx(0.0, abs=1e-6)
    orth = torch.eye(4)
    # pairwise cosine of distinct orthonormal vectors is 0 -> distance 1
    assert diversity_direction(orth) == pytest.approx(1.0, abs=1e-6)
    x = torch.randn(2000, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0])
    assert diversity_magnitude(x) == pytest.approx(2.0, rel=0.05)
    # rank: isotropic 3-d data uses ~3 directions, a line uses 1
    assert effective_rank(torch.randn(500, 3, generator=g)) == pytest.approx(3.0, rel=0.05)
    line = torch.randn(100, 1, generator=g) * torch.tensor([[1.0, 2.0, -1.0]])
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    assert math.isnan(diversity_direction(torch.randn(1, 3)))
