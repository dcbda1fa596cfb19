"""Issue 18: the real architectures without weights (`--weights random`) and `python -m regft.plan`.

The parameter counts are the published ones (the issue's check on the shipped configs); they are
built on the meta device, so the test costs no memory and about a second after the imports.
"""
from __future__ import annotations

import pytest

from regft import realsize
from regft.generators import make_generator
from regft.search import RANDOM_WEIGHTS_NOTE, generation_config, plan_search, settings_from, trial_config
from regft.tune import FLAGS, flag_problems, parse_flags

# stabilityai/stable-diffusion-2-1-base and open_clip ViT-B-16 as published
REAL_COUNTS = {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840,
               "clip_visual": 86_192_640, "clip_total": 149_620_737}


def test_real_architecture_parameter_counts():
    assert realsize.parameter_counts() == REAL_COUNTS


def test_random_generator_identity_differs_from_real_and_needs_no_hub():
    # offline (HF_HUB_OFFLINE=1 in every test run): the real model cannot be located, the random
    # one is built from the shipped configs, and its identity can never pass for real images
    kw = dict(resolution=512, steps=2, guidance=5.0)
    gen = make_generator(realsize.SD21_BASE, options={"weights": "random"}, **kw)
    ident = gen.identity()
    assert ident["weights"] == "random" and ident["revision"] == realsize.RANDOM_REVISION
    assert ident["model"] == realsize.SD21_BASE
    with pytest.raises(RuntimeError, match="not in the Hugging Face cache"):
        make_generator(realsize.SD21_BASE, **kw)
    with pytest.raises(ValueError, match="builds only the architectures shipped"):
        make_generator("someone/other-model", options={"weights": "random"}, **kw)


def _settings(tmp_path, *argv):
    values, preset = parse_flags(["cars", "--preset", "paper", "--storage", str(tmp_path / "s"),
                                  "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", *argv])
    return settings_from(values, preset)


def test_weights_flag_reaches_training_and_generation(tmp_path):
    s = _settings(tmp_path, "--weights", "random")
    assert trial_config(s, [0.5]).pretrained is None  # open_clip's ViT-B-16, random init
    assert generation_config(s).generator_options["weights"] == "random"
    assert "RANDOM" in RANDOM_WEIGHTS_NOTE
    plan_search(s)  # offline: nothing to download, so nothing missing
    real = _settings(tmp_path)
    assert real.weights == "auto" and trial_config(real, [0.5]).pretrained == "openai"
    assert "weights" not in generation_config(real).generator_options


@pytest.mark.parametrize("weights", [None, "auto", "pretrained"])
def test_tune_never_falls_back_to_random_weights(tmp_path, weights):
    s = _settings(tmp_path, *(["--weights", weights] if weights else []))
    with pytest.raises(ValueError) as e:
        plan_search(s)
    msg = str(e.value)
    assert "weights for ViT-B-16/openai" in msg and "not in the Hugging Face cache" in msg


def test_weights_flag_choices_are_realsize_choices(tmp_path):
    flag = next(f for f in FLAGS if f.name == "--weights")
    assert flag.choices == realsize.WEIGHTS_CHOICES
    assert flag_problems(_settings(tmp_path, "--weights", "random")) == []
