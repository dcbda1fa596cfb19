import subprocess
import sys
import time

import pytest
import torch

from regft.models import WeightsUnavailable, build_classifier, check_weights_available, create_clip
from regft.tasks import load_task


def test_tiny_model_builds_seeded_and_classifies():
    a = create_clip("tiny", seed=3)
    b = create_clip("tiny", seed=3)
    assert a.image_size == 32 and a.embed_dim == 64
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k
    clf = build_classifier(a, load_task("eurosat"))
    logits, z = clf(torch.randn(3, 3, 32, 32), return_features=True)
    assert logits.shape == (3, 10) and z.shape == (3, 64)


def test_real_weights_offline_fail_fast_with_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.time()
    with pytest.raises(WeightsUnavailable) as e:
        create_clip("ViT-B-16", "openai")
    assert time.time() - t < 10
    msg = str(e.value)
    assert "\n" not in msg and "ViT-B-16/openai" in msg and "--model tiny" in msg


def test_unknown_model_and_tag():
    with pytest.raises(ValueError, match="unknown model"):
        check_weights_available("ViT-Q-99", "openai")
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        check_weights_available("ViT-B-16", "nosuchtag")


def test_cli_offline_error_is_one_line_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "regft.models", "--model", "ViT-B-16", "--pretrained", "openai"],
        capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().startswith("error: weights for ViT-B-16/openai")
    assert len(out.stderr.strip().splitlines()) == 1
