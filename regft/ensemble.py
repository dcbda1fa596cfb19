"""Weight-space ensemble (WiSE-FT style), pure torch.

theta(alpha) = (1 - alpha) * theta_0 + alpha * theta_1 over every floating-point parameter and
buffer, classification head included. theta_0 is the zero-shot model (whose head fine-tuning
started from), theta_1 the fine-tuned model. Non-float entries (integer buffers such as
position ids or BatchNorm counters) are not interpolable: they must be equal and are copied.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from regft.errors import EnsembleError


def check_compatible(theta_0: Mapping[str, torch.Tensor], theta_1: Mapping[str, torch.Tensor]):
    """Raise EnsembleError listing every key/shape/dtype mismatch at once."""
    problems = []
    k0, k1 = set(theta_0), set(theta_1)
    if k0 - k1:
        problems.append(f"keys only in theta_0: {sorted(k0 - k1)[:5]}")
    if k1 - k0:
        problems.append(f"keys only in theta_1: {sorted(k1 - k0)[:5]}")
    for key in sorted(k0 & k1):
        a, b = theta_0[key], theta_1[key]
        if a.shape != b.shape:
            problems.append(f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        elif a.is_floating_point() != b.is_floating_point():
            problems.append(f"{key}: dtype {a.dtype} vs {b.dtype}")
        elif not a.is_floating_point() and not torch.equal(a, b):
            problems.append(f"{key}: non-float entries differ and cannot be interpolated")
    if problems:
        raise EnsembleError("cannot interpolate state dicts: " + "; ".join(problems))


def interpolate(
    theta_0: Mapping[str, torch.Tensor], theta_1: Mapping[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """Return (1 - alpha) * theta_0 + alpha * theta_1. alpha=0 and alpha=1 are bit-exact copies."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise EnsembleError(f"alpha must be in [0, 1], got {alpha}")
    check_compatible(theta_0, theta_1)
    out = {}
    for key, a in theta_0.items():
        b = theta_1[key]
        if not a.is_floating_point() or alpha == 0.0:
            out[key] = a.clone()
        elif alpha == 1.0:
            out[key] = b.clone()
        else:
            # interpolate in fp32 at least, return in the dtype of theta_0
            mixed = torch.lerp(a.float(), b.to(a.device).float(), float(alpha))
            out[key] = mixed.to(a.dtype)
    return out


ALPHA_DIGITS = 6  # grid points are rounded to this many decimals (0.1 * 3 -> 0.3)
ALPHA_EPS = 1e-9  # a grid that stops this close below `high` ends at `high` already


def alpha_grid(step: float = 0.1, low: float = 0.0, high: float = 1.0) -> list[float]:
    """Evenly spaced alphas from low to high inclusive, rounded so 0.1*3 prints as 0.3."""
    if step <= 0 or not 0.0 <= low <= high <= 1.0:
        raise EnsembleError(f"bad alpha grid: low={low}, high={high}, step={step}")
    n = int(round((high - low) / step))
    grid = [round(low + i * step, ALPHA_DIGITS) for i in range(n + 1)]
    if grid[-1] < high - ALPHA_EPS:
        grid.append(high)
    return [min(a, high) for a in grid]
