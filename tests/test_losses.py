"""VC regularizer against an independent reference (numpy, explicit loops) on seeded tensors."""
import numpy as np
import pytest
import torch

from regft.losses import off_diagonal, vc_loss, vc_terms


def reference_vc(z: np.ndarray) -> tuple[float, float]:
    """Straight from docs/method.md, with numpy's covariance (ddof=1) and explicit loops."""
    b, d = z.shape
    cov = np.cov(z, rowvar=False, ddof=1)
    v = sum(max(0.0, 1.0 - np.sqrt(cov[j, j] + 1e-7)) for j in range(d)) / d
    c = sum(cov[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / (d * (d - 1))
    return v, c


@pytest.mark.parametrize("b,d,scale", [(2, 3, 1.0), (8, 5, 0.3), (32, 16, 2.0), (5, 40, 0.1)])
def test_vc_terms_match_reference(b, d, scale):
    g = torch.Generator().manual_seed(b * 100 + d)
    z = torch.randn(b, d, generator=g, dtype=torch.float64) * scale
    v, c = vc_terms(z)
    rv, rc = reference_vc(z.numpy())
    assert v.item() == pytest.approx(rv, rel=1e-5, abs=1e-7)
    assert c.item() == pytest.approx(rc, rel=1e-5, abs=1e-9)


def test_variance_hinge_is_zero_when_std_above_one():
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(0)) * 10
    v, _ = vc_terms(z)
    assert v.item() == 0.0


def test_weights_scale_terms_and_zero_switches_off():
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    v, c = vc_terms(z)
    out = vc_loss(z, vc_weight=0.16, vc_cov_ratio=0.125)
    assert out.loss.item() == pytest.approx(0.16 * v.item() + 0.02 * c.item(), rel=1e-6)
    assert vc_loss(z, 0.0).loss.item() == 0.0


def test_gradient_matches_reference_formula():
    """d(loss)/dz from vc_loss equals autograd through an independent torch reference."""
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(12, 6, generator=g, dtype=torch.float64) * 0.5

    z1 = z0.clone().requires_grad_(True)
    vc_loss(z1, vc_weight=0.3, vc_cov_ratio=0.5).loss.backward()

    z2 = z0.clone().requires_grad_(True)
    cov = torch.cov(z2.T, correction=1)
    d = z2.shape[1]
    v = torch.clamp(1 - torch.sqrt(torch.diag(cov) + 1e-7), min=0).sum() / d
    mask = ~torch.eye(d, dtype=torch.bool)
    c = (cov[mask] ** 2).sum() / (d * (d - 1))
    (0.3 * v + 0.15 * c).backward()
    # vc_terms computes in fp32, so compare at fp32 precision
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-4, atol=1e-6)


def test_zero_weight_gives_zero_gradient_and_positive_weight_does_not():
    z = torch.randn(10, 4, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    vc_loss(z, 0.0).loss.backward()
    assert torch.count_nonzero(z.grad) == 0
    z.grad = None
    vc_loss(z, 1.0).loss.backward()
    assert torch.count_nonzero(z.grad) > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least 2"):
        vc_terms(torch.randn(1, 4))
    with pytest.raises(ValueError, match="batch, dim"):
        vc_terms(torch.randn(4))
    with pytest.raises(ValueError, match=">= 0"):
        vc_loss(torch.randn(4, 3), vc_weight=-1.0)


def test_off_diagonal():
    m = torch.arange(9.0).view(3, 3)
    assert off_diagonal(m).tolist() == [1.0, 2.0, 3.0, 5.0, 6.0, 7.0]
