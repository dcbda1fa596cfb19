"""regft.generate's command line: --scheduler, --json, and the generation settings that enter the
dataset id (tiny pipelines: 32 px, 2 steps, 2 classes x 2 images)."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest

from regft import raylocal
from regft.generate import GenerationConfig, main, plan_dataset

CLASSES = ["red apple", "green pear"]
PER_CLASS = 2
ARGS = ["--generator", "tiny", "--images-per-class", str(PER_CLASS), "--steps", "2",
        "--batch-size", "2", "--num-actors", "1", "--no-progress", "--no-samples"]


@pytest.fixture
def classnames(tmp_path):
    p = tmp_path / "fruit.txt"
    p.write_text("\n".join(CLASSES) + "\n")
    return str(p)


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture
def no_ray(monkeypatch):
    """Refusals must come before Ray starts: starting it fails the test."""
    def refuse(*a, **k):
        raise AssertionError("Ray was started for a request that must be refused first")
    monkeypatch.setattr(raylocal, "init", refuse)


@pytest.mark.timeout(600)
def test_json_says_what_this_call_generated(ray_local, regft_cache, classnames, tmp_path):
    store, result = tmp_path / "store", tmp_path / "out" / "result.json"  # its folder is made
    argv = ["--classnames", classnames, "--store", str(store), "--json", str(result), *ARGS]
    rc, out, err = _run(argv)
    assert rc == 0, err
    first = json.loads(result.read_text())
    assert set(first) == {"dataset", "dataset_id", "images", "generated"}
    images = len(CLASSES) * PER_CLASS
    assert first["images"] == first["generated"] == images
    assert os.path.basename(first["dataset"]) == first["dataset_id"]
    manifest = json.loads((store / first["dataset_id"] / "manifest.json").read_text())
    assert manifest["complete"] and manifest["num_images"] == images
    rc, out, err = _run(argv)  # the same request again: reused, nothing generated
    assert rc == 0, err
    again = json.loads(result.read_text())
    assert again == {**first, "generated": 0}
    assert not [p for p in os.listdir(result.parent) if p != result.name]  # no temporary left


def test_settings_are_refused_before_ray_naming_every_flag(no_ray, regft_cache, classnames, tmp_path):
    rc, out, err = _run(["--classnames", classnames, "--store", str(tmp_path / "s"),
                         "--scheduler", "NoSuchScheduler", "--json", str(tmp_path), *ARGS])
    assert rc == 2 and out == "" and "Traceback" not in err
    assert err.startswith("error: 2 problems:")
    assert "scheduler (--scheduler): 'NoSuchScheduler' is not a diffusers scheduler class" in err
    assert "--json" in err and "is a folder" in err
    # a real scheduler this pipeline cannot use (SDXL's model takes Karras-family ones only)
    rc, out, err = _run(["--classnames", classnames, "--store", str(tmp_path / "s"), *ARGS,
                         "--generator", "tiny-sdxl", "--scheduler", "FlowMatchEulerDiscreteScheduler"])
    assert rc == 2 and err.count("\n") == 1
    assert "--scheduler" in err and "StableDiffusionXLPipeline" in err and "use one of" in err
    # known without the model: reported next to a field problem that stops the model's checks
    rc, out, err = _run(["--classnames", classnames, "--store", str(tmp_path / "s"), *ARGS,
                         "--resolution", "30", "--scheduler", "NoSuchScheduler"])
    assert rc == 2 and "--resolution" in err and "--scheduler" in err


def test_tune_names_its_own_generation_scheduler_flag(regft_cache, classnames):
    from regft import search, tune

    values, preset = tune.parse_flags(["fruit", "--classnames", classnames, "--generator", "tiny",
                                       "--gen-scheduler", "NoSuchScheduler"])
    problems = tune.flag_problems(search.settings_from(values, preset))
    assert [p for p in problems if p.startswith("--gen-scheduler: 'NoSuchScheduler' is not")]
    values, preset = tune.parse_flags(["fruit", "--classnames", classnames, "--generator", "tiny",
                                       "--gen-scheduler", "DPMSolverMultistepScheduler"])
    settings = search.settings_from(values, preset)
    assert tune.flag_problems(settings) == []
    assert search.generation_config(settings).scheduler == "DPMSolverMultistepScheduler"


def test_dataset_id_changes_with_scheduler_steps_guidance_and_generator(regft_cache, classnames,
                                                                         tmp_path):
    base = GenerationConfig(classnames_file=classnames, generator="tiny", images_per_class=PER_CLASS,
                            steps=2, store=str(tmp_path), progress=False)
    variants = {"base": base, "scheduler": GenerationConfig(**{**vars(base), "scheduler": "DDIMScheduler"}),
                "steps": GenerationConfig(**{**vars(base), "steps": 3}),
                "guidance": GenerationConfig(**{**vars(base), "guidance": 7.5}),
                "generator": GenerationConfig(**{**vars(base), "generator": "tiny-sdxl"})}
    plans = {k: plan_dataset(v) for k, v in variants.items()}
    ids = {k: p.dataset_id for k, p in plans.items()}
    assert len(set(ids.values())) == len(ids), ids
    assert plan_dataset(base).dataset_id == ids["base"]  # stable for the same request
    assert plans["scheduler"].identity["scheduler"]["class"] == "DDIMScheduler"
    assert plans["generator"].identity["pipeline"] == "StableDiffusionXLPipeline"
    # tiny-sdxl is saved at its native size, like tiny
    assert plans["generator"].spec["output_size"] == plans["generator"].spec["resolution"] == 32
