import pytest
import torch

from regft.ensemble import EnsembleError, alpha_grid, interpolate


def _sd(seed):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "head.weight": torch.randn(5, 3, generator=g),
        "half": torch.randn(3, generator=g).half(),
        "pos_ids": torch.arange(7),
    }


def test_endpoints_are_bit_exact():
    a, b = _sd(0), _sd(1)
    b["pos_ids"] = a["pos_ids"].clone()
    out0, out1 = interpolate(a, b, 0.0), interpolate(a, b, 1.0)
    for k in a:
        assert torch.equal(out0[k], a[k]) and out0[k].dtype == a[k].dtype
        assert torch.equal(out1[k], b[k])


def test_midpoint_and_head_included():
    a, b = _sd(0), _sd(1)
    out = interpolate(a, b, 0.25)
    torch.testing.assert_close(out["w"], 0.75 * a["w"] + 0.25 * b["w"])
    torch.testing.assert_close(out["head.weight"], 0.75 * a["head.weight"] + 0.25 * b["head.weight"])
    assert out["half"].dtype == torch.float16
    assert torch.equal(out["pos_ids"], a["pos_ids"])


def test_mismatches_are_reported_together():
    a, b = _sd(0), _sd(1)
    b["w"] = torch.randn(2, 2)
    b["pos_ids"] = torch.arange(7) + 1
    del b["head.weight"]
    b["extra"] = torch.zeros(1)
    with pytest.raises(EnsembleError) as e:
        interpolate(a, b, 0.5)
    msg = str(e.value)
    for part in ("only in theta_0", "only in theta_1", "w: shape", "pos_ids: non-float"):
        assert part in msg


def test_alpha_out_of_range():
    with pytest.raises(EnsembleError, match=r"\[0, 1\]"):
        interpolate(_sd(0), _sd(0), 1.5)


def test_alpha_grid():
    assert alpha_grid() == [round(0.1 * i, 6) for i in range(11)]
    assert alpha_grid(0.25, 0.5, 1.0) == [0.5, 0.75, 1.0]
    with pytest.raises(EnsembleError):
        alpha_grid(0.0)
