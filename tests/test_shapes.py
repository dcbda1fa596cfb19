"""Shapes testbed: rendering, generator purity, style shift, shipped checkpoint, pretraining."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from regft import shapes

ROOT = Path(__file__).resolve().parents[1]


def _load_pretrain_script():
    spec = importlib.util.spec_from_file_location("pretrain_shapes", ROOT / "scripts" / "pretrain_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_task_classes_need_both_attributes():
    task = shapes.shapes_task()
    assert task.name == "shapes" and task.num_classes == 16
    assert task.real_test == "shapes:real"
    pairs = [shapes.parse_classname(c) for c in task.classnames]
    colours = [c for c, _ in pairs]
    kinds = [s for _, s in pairs]
    assert all(colours.count(c) == 2 for c in shapes.COLOURS)
    assert all(kinds.count(s) == 2 for s in shapes.SHAPES)
    from regft.tasks import load_task

    assert load_task("shapes") == task


def test_task_file_equals_the_testbed_code():
    """regft/data/tasks/shapes.json was written once from the code; the two stay equal."""
    import json

    from regft.tasks import SHAPES_REAL, available_tasks

    rec = json.loads((ROOT / "regft" / "data" / "tasks" / "shapes.json").read_text(encoding="utf-8"))
    assert tuple(rec["classnames"]) == shapes.TASK_CLASSES
    assert tuple(rec["templates"]) == shapes.TEMPLATES
    assert rec["generation_template"] == shapes.GENERATION_TEMPLATE
    assert rec["generation_classnames"] == [] and "descriptions" not in rec
    assert rec["real_test"] == SHAPES_REAL == "shapes:real"
    assert "shapes" in available_tasks()


def test_render_is_deterministic_and_seed_dependent():
    a = shapes.render("red circle", 7, 0.0)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, shapes.render("red circle", 7, 0.0))
    assert not np.array_equal(a, shapes.render("red circle", 8, 0.0))
    assert shapes.render("blue star", 1, 0.5, resolution=48).shape == (48, 48, 3)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="not '<colour> <shape>'"):
        shapes.render("teal blob", 0)
    with pytest.raises(ValueError, match="gap must be in"):
        shapes.ShapesGenerator(32, gap=1.5)
    with pytest.raises(ValueError, match="equal lengths"):
        shapes.ShapesGenerator().generate(["p"], [1, 2], [0], ["red circle"])


def test_generator_is_pure_and_batch_order_independent():
    gen = shapes.ShapesGenerator(resolution=32, gap=1.0)
    names = list(shapes.TASK_CLASSES[:6])
    seeds = [11, 2**62 + 5, 3, 3, 99, 1234567]
    prompts = [f"a photo of a {n}." for n in names]
    batch = gen.generate(prompts, seeds, list(range(6)), names)
    rev = gen.generate(prompts[::-1], seeds[::-1], list(range(6))[::-1], names[::-1])[::-1]
    singles = [gen.generate([p], [s], [0], [n])[0] for p, s, n in zip(prompts, seeds, names)]
    for a, b, c in zip(batch, rev, singles):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    # the prompt and label do not matter, the class name and seed do
    assert np.array_equal(gen.generate(["x"], [11], [5], [names[0]])[0], batch[0])
    assert gen.identity() == {"generator": "shapes", "version": shapes.SHAPES_VERSION,
                              "resolution": 32, "gap": 1.0}
    # gap 0 is exactly the real domain
    zero = shapes.ShapesGenerator(32, 0.0).generate(prompts[:1], seeds[:1], [0], names[:1])[0]
    assert np.array_equal(zero, shapes.render(names[0], seeds[0], 0.0))


def _corner_colours(gap: float, names, n: int) -> np.ndarray:
    # mean colour of the 3x3 top-left corner (background in both domains, almost always)
    return np.stack([
        np.stack([shapes.render(c, s, gap)[:3, :3].reshape(-1, 3).mean(0) for s in range(n)])
        for c in names
    ]).astype(float)  # (classes, n, 3)


def test_generated_domain_has_a_class_correlated_style_shift():
    names = shapes.TASK_CLASSES[:6]
    real, gen = _corner_colours(0.0, names, 30), _corner_colours(1.0, names, 30)

    def within_over_total(x):  # fraction of background colour variance that is within-class
        return x.var(axis=1).mean() / x.reshape(-1, 3).var(axis=0).mean()

    assert within_over_total(real) > 0.8  # real backgrounds do not depend on the class
    assert within_over_total(gen) < 0.25  # generated backgrounds do
    # generated objects are larger (more non-background pixels) and images smoother (blur)
    r = np.stack([shapes.render(c, s, 0.0) for c in names for s in range(20)]).astype(float)
    g = np.stack([shapes.render(c, s, 1.0) for c in names for s in range(20)]).astype(float)
    centre = slice(12, 20)
    assert np.abs(np.diff(g, axis=2)).mean() < 0.7 * np.abs(np.diff(r, axis=2)).mean()
    assert g[:, centre, centre].std(axis=(1, 2)).mean() < r[:, centre, centre].std(axis=(1, 2)).mean()


def test_real_test_split_is_class_major_and_reproducible():
    imgs, labels = shapes.render_real_test(3, seed=0)
    assert imgs.shape == (48, 32, 32, 3) and labels.tolist() == [k for k in range(16) for _ in range(3)]
    again, _ = shapes.render_real_test(3, seed=0)
    other, _ = shapes.render_real_test(3, seed=1)
    assert np.array_equal(imgs, again) and not np.array_equal(imgs, other)


def test_a_real_val_split_is_other_real_images_than_the_test_split():
    test, labels = shapes.render_real_test(3, seed=0)
    val, val_labels = shapes.render_real_test(3, seed=0, split="val")
    assert np.array_equal(labels, val_labels)
    assert np.array_equal(val, shapes.render_real_test(3, seed=0, split="val")[0])
    assert not any(np.array_equal(v, t) for v in val for t in test)


def test_write_real_test_imagefolder(tmp_path):
    root = shapes.write_real_test(str(tmp_path / "real"), n_per_class=2)
    folders = sorted(p.name for p in Path(root).iterdir())
    assert len(folders) == 16 and "red_circle" in folders
    assert len(list((Path(root) / "red_circle").glob("*.png"))) == 2


def test_shipped_checkpoint_loads_via_local_dir_and_beats_chance():
    from PIL import Image

    from regft.metrics import accuracy
    from regft.models import build_classifier, create_clip

    folder = Path(shapes.shapes_pretrained_dir())
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 8e6, f"shipped checkpoint is {size / 1e6:.1f} MB"
    name = shapes.shapes_model_name()
    assert name.startswith("local-dir:")
    bundle = create_clip(name, None)
    clf = build_classifier(bundle, shapes.shapes_task()).eval()
    imgs, labels = shapes.render_real_test(20, seed=shapes.REAL_TEST_SEED)
    x = torch.stack([bundle.preprocess_eval(Image.fromarray(a)) for a in imgs])  # (N, 3, 32, 32)
    with torch.no_grad():
        acc = accuracy(clf(x), torch.from_numpy(labels))
    assert acc > 0.4, f"zero-shot accuracy {acc:.3f} (chance 0.0625)"


def test_pretraining_is_deterministic(tmp_path):
    mod = _load_pretrain_script()
    outs = []
    for run in ("a", "b"):
        out = tmp_path / run
        argv = ["--steps", "3", "--warmup", "1", "--out", str(out), "--eval-per-class", "2",
                "--log-every", "0"]
        assert mod.main(argv) == 0
        outs.append((out / "open_clip_model.safetensors").read_bytes())
        assert (out / "open_clip_config.json").is_file() and (out / "MADE.md").is_file()
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_full_pretraining_reproduces_shipped_checkpoint(tmp_path):
    """~5+ minutes on 2 cores: the recorded zero-shot accuracy is reproduced within 0.01."""
    made = (Path(shapes.shapes_pretrained_dir()) / "MADE.md").read_text(encoding="utf-8")
    recorded = float(re.search(r"\*\*([0-9.]+)\*\*", made).group(1))
    steps = int(re.search(r"steps (\d+)\.", made).group(1))
    mod = _load_pretrain_script()
    out = tmp_path / "repro"
    assert mod.main(["--steps", str(steps), "--out", str(out), "--log-every", "0"]) == 0
    got = float(re.search(r"\*\*([0-9.]+)\*\*", (out / "MADE.md").read_text()).group(1))
    assert abs(got - recorded) <= 0.01, (got, recorded)


# ------------------------------------------------------------- diversity collapse ----

# What the shapes generator made before the collapse knob existed (commit 58af9db), recomputed
# here: the dataset id of every shipped testbed setting (the smoke preset, seeds 0-4, and the
# gaps of docs/shapes-testbed.md's figures) and hashes of the pixels. collapse=0 must keep them.
SHIPPED_IDS = {
    ("seed", 0): "shapes-4c40ec2cbb18b9ce", ("seed", 1): "shapes-4a07ac53a5008d89",
    ("seed", 2): "shapes-70e14cada8c604c6", ("seed", 3): "shapes-a547a792a89e3012",
    ("seed", 4): "shapes-f92ae66610c38c08", ("gap", 0.0): "shapes-03d915b7f01d13be",
    ("gap", 0.5): "shapes-4c40ec2cbb18b9ce", ("gap", 0.75): "shapes-4b9abac354d914eb",
    ("gap", 1.0): "shapes-09be0120c078e10e",
}
PIXELS_SHA256 = "aa31d47ec993eb00c29eced7a8abc8e46fdaf90c70481afd069827360f14d0eb"
REAL_TEST_SHA256 = "d8f8a5ccc619112df6ff56c89a8195bd93e47402a4f6419a78214fa869fff3d9"
HARNESS_SEED0_SHA256 = "5e5022d4784209f10b579e7a999aa53fd7457def52014529d38aaa3ff8acfd1a"


def _preset_dataset_id(tmp_path, extra: dict) -> str:
    from regft import search
    from regft.generate import plan_dataset
    from regft.tune import preset_file

    values = {"task": "shapes", "storage": str(tmp_path / "store"), **extra}
    settings = search.settings_from(values, preset_file("smoke", "shapes"))
    return plan_dataset(search.generation_config(settings)).dataset_id


def test_collapse_zero_reproduces_every_shipped_dataset_id_and_pixel(tmp_path):
    import hashlib

    from regft.prompts import make_items

    for explicit in ({}, {"generation.generator_options.collapse": 0.0}):
        for (kind, v), want in SHIPPED_IDS.items():
            key = "seed" if kind == "seed" else "generation.generator_options.gap"
            assert _preset_dataset_id(tmp_path, {key: v, **explicit}) == want, (kind, v, explicit)
    h = hashlib.sha256()
    for gap in (0.0, 0.5, 1.0):
        for name in shapes.TASK_CLASSES:
            for seed in (0, 7, 123456789):
                h.update(shapes.render(name, seed, gap, collapse=0.0).tobytes())
    assert h.hexdigest() == PIXELS_SHA256
    imgs, labels = shapes.render_real_test()
    assert hashlib.sha256(imgs.tobytes() + labels.tobytes()).hexdigest() == REAL_TEST_SHA256
    task = shapes.shapes_task()  # the harness's gap-0.5 seed-0 dataset (the headline rows)
    items = make_items(task.name, task.gen_names, task.generation_template, 100, 0)
    gen = shapes.ShapesGenerator(32, 0.5, collapse=0)
    h = hashlib.sha256()
    for a in gen.generate([i.prompt for i in items], [i.seed for i in items],
                          [i.label for i in items], [i.classname for i in items]):
        h.update(a.tobytes())
    assert h.hexdigest() == HARNESS_SEED0_SHA256
    assert "collapse" not in gen.identity()


def test_collapse_enters_the_identity_and_the_dataset_id(tmp_path):
    ids = {c: _preset_dataset_id(tmp_path, {"generation.generator_options.collapse": c})
           for c in (0.0, 0.5, 1, 1.0)}
    assert ids[0.0] == SHIPPED_IDS[("seed", 0)]
    assert len({ids[0.0], ids[0.5], ids[1.0]}) == 3 and ids[1] == ids[1.0]
    assert shapes.ShapesGenerator(32, 0.5, 0.25).identity()["collapse"] == 0.25


def _nuisances(name: str, seed: int, collapse: float) -> tuple:
    d = shapes._collapse_draws(shapes._draw(shapes._rng(name, seed), 32), name, seed, collapse, 32)
    return d, tuple(np.round(np.concatenate([np.ravel(getattr(d, f)) for f in d.__dataclass_fields__
                                             if f != "noise"]), 9))


def test_full_collapse_leaves_a_few_modes_per_class_and_keeps_the_pixel_noise():
    """At 1 every nuisance but the pixel noise comes from one of COLLAPSE_MODES per class,
    chosen by the image (every mode in use); at 0 every image has its own; in between the
    nuisances are nearer the mode, and the noise is always the image's own."""
    seeds = range(60)
    for name in shapes.TASK_CLASSES[:4]:
        full = {_nuisances(name, s, 1.0)[1] for s in seeds}
        assert len(full) == shapes.COLLAPSE_MODES
        assert len({_nuisances(name, s, 0.0)[1] for s in seeds}) == len(seeds)
        for s in seeds[:5]:
            free, half = _nuisances(name, s, 0.0)[0], _nuisances(name, s, 0.5)[0]
            assert np.array_equal(free.noise, half.noise)
            mode = _nuisances(name, s, 1.0)[0]
            assert np.isclose(half.r_real, (free.r_real + mode.r_real) / 2)
    # the modes are the class's (the prompt's), not a seed's: other classes have other modes
    assert not {_nuisances("red circle", s, 1.0)[1] for s in seeds} & \
        {_nuisances("cyan circle", s, 1.0)[1] for s in seeds}


def test_collapse_makes_near_duplicates_within_a_class_not_another_class():
    """Collapse is about near-duplicates: the distance from an image to its nearest other image of
    the class falls with collapse, down to the pixel noise at 1. (The mean pairwise spread does
    not fall monotonically: the modes are typical draws, docs/shapes-testbed.md.)"""
    def nearest_neighbour(collapse: float) -> float:
        out = []
        for name in shapes.TASK_CLASSES[:3]:
            x = np.stack([shapes.render(name, s, 0.5, collapse=collapse) for s in range(30)])
            x = x.reshape(30, -1).astype(float) / 255
            d = np.sqrt(((x[:, None] - x[None]) ** 2).mean(-1))
            np.fill_diagonal(d, np.inf)
            out.append(d.min(axis=1).mean())
        return float(np.mean(out))

    nn = [nearest_neighbour(c) for c in (0.0, 0.5, 1.0)]
    assert nn[0] > nn[1] > nn[2] and nn[2] < 0.4 * nn[0], nn
    # the object keeps its class colour at full collapse
    img = shapes.render("blue triangle", 3, 0.0, collapse=1.0).astype(float) / 255
    blue = (img[..., 2] > img[..., 0] + 0.3) & (img[..., 2] > img[..., 1] + 0.3)
    assert blue.sum() > 20


@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan"), float("inf"), "0.5", True, None])
def test_collapse_outside_0_1_is_refused_naming_it(bad):
    from regft.generators import make_generator

    with pytest.raises(ValueError, match="collapse must be in"):
        shapes.ShapesGenerator(32, 0.5, collapse=bad)
    with pytest.raises(ValueError, match="collapse must be in"):
        shapes.render("red circle", 0, 0.5, collapse=bad)
    with pytest.raises(ValueError, match="collapse must be in"):
        make_generator("shapes", resolution=32, steps=1, guidance=0.0, options={"collapse": bad})


@pytest.fixture
def no_ray_workdir(tmp_path, monkeypatch, regft_cache):
    from regft import raylocal

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started: the bad input was not refused up front")

    monkeypatch.setattr(raylocal, "init", no_ray)
    return tmp_path


TUNE_SHAPES = ["shapes", "--preset", "smoke", "--storage", "store", "--tracking-uri",
               "sqlite:///mlflow.db"]


@pytest.mark.parametrize("argv,named", [
    (["--collapse", "1.5"], "--collapse: must be in [0, 1]"),
    (["--collapse", "-0.5"], "--collapse: must be in [0, 1]"),
    (["--collapse", "nan"], "argument --collapse"),
    (["--collapse", "inf"], "argument --collapse"),
    (["--collapse", "abc"], "argument --collapse"),
    (["--generator", "tiny", "--collapse", "0.5"], "--collapse: only --generator shapes"),
])
def test_tune_refuses_a_bad_collapse_before_ray(argv, named, no_ray_workdir, capsys):
    from regft import tune

    rc = tune.main([*TUNE_SHAPES, *argv])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and "Traceback" not in err and len(err) < 500, err[-1500:]
    assert not (no_ray_workdir / "store").exists()


@pytest.mark.parametrize("value", ["1.5", ".nan", ".inf", "'half'", "true"])
def test_a_bad_collapse_in_a_preset_is_refused_naming_it(value, tmp_path, monkeypatch):
    from regft import search, tune

    preset = tmp_path / "p.yaml"
    preset.write_text("generation:\n  generator: shapes\n  generator_options:\n"
                      f"    collapse: {value}\n", encoding="utf-8")
    settings = search.settings_from({"task": "shapes", "storage": str(tmp_path / "s")}, preset)
    problems = tune.flag_problems(settings)
    assert any(p.startswith("--collapse: must be in [0, 1]") for p in problems), problems


def test_generate_refuses_a_bad_collapse_option(tmp_path, capsys, regft_cache):
    from regft import generate

    rc = generate.main(["shapes", "--generator", "shapes", "--generator-option", "collapse=2",
                        "--store", str(tmp_path / "store"), "--images-per-class", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "collapse must be in [0, 1]" in err and "Traceback" not in err, err[-1500:]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
