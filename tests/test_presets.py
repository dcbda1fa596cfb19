"""Presets (regft/presets/*.yaml) and the settings they build: every shipped file loads and opens
with its command, an unknown or derived key is refused naming the file and the key, and flags
override the preset, which overrides the dataclass defaults."""
from __future__ import annotations

import pytest

from regft import search, tune
from regft.errors import UserError
from regft.generate import GenerationConfig
from regft.shapes import shapes_model_name
from regft.train import TrainConfig


def _settings(argv):
    return search.settings_from(*tune.parse_flags(argv))


def test_every_shipped_preset_loads_and_opens_with_its_command():
    files = sorted(tune.PRESETS_DIR.glob("*.yaml"))
    assert {f.stem for f in files} == {"smoke", "smoke-shapes", "paper"}
    assert tune.preset_names() == ["paper", "smoke"]
    for f in files:
        first = f.read_text().splitlines()[0]
        assert first.startswith("# python -m regft.tune "), f
        s = search.settings_from({"task": "cars", "preset": f.stem}, f)
        assert tune.flag_problems(s) == [], f


def test_preset_variant_per_task():
    assert tune.preset_file("smoke", "shapes").name == "smoke-shapes.yaml"
    assert tune.preset_file("smoke", "cars").name == "smoke.yaml"
    assert tune.preset_file("smoke", "../smoke-shapes").name == "smoke.yaml"  # a task is no path
    s = _settings(["shapes", "--preset", "smoke"])
    assert s.train.model == shapes_model_name() and s.generation.generator == "shapes"
    assert s.generation.generator_options == {"gap": 0.5} and s.train.real_test == "shapes:real"
    tiny = _settings(["cars", "--preset", "smoke"])
    assert (tiny.train.model, tiny.generation.generator, tiny.max_classes) == ("tiny", "tiny", 4)


def test_paper_preset_keeps_the_papers_values():
    s = _settings(["cars", "--preset", "paper"])
    assert (s.train.model, s.train.pretrained, s.train.epochs, s.train.batch_size,
            s.train.warmup_steps) == ("ViT-B-16", "openai", 10, 128, 500)
    g = s.generation
    assert (g.generator, g.images_per_class, g.steps, g.guidance) == (
        "stabilityai/stable-diffusion-2-1-base", 64, 50, 5.0)
    assert (s.gpus_per_trial, s.num_samples) == (1.0, 24)
    assert search.trial_config(s, [0.0, 1.0]).use_gpu


def test_flags_override_preset_which_overrides_defaults():
    s = _settings(["shapes", "--preset", "smoke", "--epochs", "3", "--gap", "0.2",
                   "--gen-batch-size", "7", "--workers-per-trial", "2", "--seed", "5"])
    assert s.train.epochs == 3 and s.train.num_workers == 2  # flags
    assert s.train.batch_size == 128 and s.generation.images_per_class == 100  # preset
    assert s.generation.generator_options == {"gap": 0.2} and s.generation.batch_size == 7
    assert s.train.lr == TrainConfig().lr and s.generation.shard_size == GenerationConfig().shard_size
    assert s.scheduler == "asha"  # the settings' own default
    trial, gen = search.trial_config(s, [0.0, 0.5, 1.0]), search.generation_config(s)
    assert (trial.task, trial.seed, gen.task, gen.seed) == ("shapes", 5, "shapes", 5)
    assert trial.alpha_grid == [0.0, 0.5, 1.0] and not trial.use_gpu and not gen.use_gpu
    bare = _settings(["cars"])
    assert bare.train == TrainConfig() and bare.generation == GenerationConfig()


def test_unknown_and_derived_keys_are_refused_naming_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("# python -m regft.tune cars\nnum_sampels: 3\n"
                   "train: {lrr: 0.1, use_gpu: true, epochs: ten}\ngeneration: {stepz: 2}\n")
    with pytest.raises(UserError) as e:
        search.settings_from({"task": "cars"}, bad)
    msg = str(e.value)
    for needle in (f"{bad}: unknown key 'num_sampels'", f"{bad}: train: unknown key 'lrr'",
                   f"{bad}: train.use_gpu: set by the search", f"{bad}: train.epochs: expected int",
                   f"{bad}: generation: unknown key 'stepz'"):
        assert needle in msg, needle
    assert len(e.value.problems) == 5  # every problem at once
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        search.settings_from({}, bad)


def test_flag_values_are_checked_by_the_flag_table():
    s = _settings(["cars", "--preset", "smoke", "--epochs", "0", "--num-samples", "-1",
                   "--guidance", "-1", "--resolution", "30", "--max-classes", "1", "--name", "a/b"])
    problems = tune.flag_problems(s)
    for needle in ("--epochs: must be > 0, got 0", "--num-samples: must be > 0, got -1",
                   "--guidance: must be >= 0", "--resolution: must be a positive multiple of 8",
                   "--max-classes: a classifier needs at least 2", "--name 'a/b'"):
        assert any(needle in p for p in problems), needle
    assert {f.path for f in tune.FLAGS} >= {"train.epochs", "generation.steps", "num_samples"}
