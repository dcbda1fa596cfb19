"""Generators: the tiny diffusers pipelines (offline, 32 px, 2 steps: SD and SDXL), schedulers,
settings a pipeline cannot take, shapes, fail-fast loading."""
from __future__ import annotations

import time

import numpy as np
import pytest

from regft.generators import (
    DiffusersGenerator,
    GeneratorSettingsError,
    ImageGenerator,
    make_generator,
    resolve_torch_dtype,
)
from regft.models import WeightsUnavailable

PROMPTS = [f"a photo of a {c}." for c in ("cat", "dog", "car", "tree", "boat", "cup")]
SEEDS = [11, 22, 33, 44, 55, 66]


@pytest.fixture(scope="module")
def one_thread(tmp_path_factory):
    import torch

    mp = pytest.MonkeyPatch()
    mp.setenv("REGFT_CACHE", str(tmp_path_factory.getbasetemp() / "regft-cache"))
    # one torch thread: OpenMP threads spin-wait, and on a busy shared machine a 2-thread run of
    # this tiny model was measured 100x slower than a 1-thread one
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        mp.undo()


@pytest.fixture(scope="module")
def tiny(one_thread):
    return make_generator("tiny", resolution=32, steps=2, guidance=5.0)


@pytest.fixture(scope="module")
def tiny_sdxl(one_thread):
    return make_generator("tiny-sdxl", resolution=32, steps=2, guidance=5.0)


def _gen(g, idx):
    return g.generate([PROMPTS[i] for i in idx], [SEEDS[i] for i in idx], [0] * len(idx),
                      ["x"] * len(idx))


def _in_batches(g, sizes):
    out, start = [], 0
    for n in sizes:
        out += _gen(g, list(range(start, start + n)))
        start += n
    return np.stack(out).astype(np.int16)


def test_tiny_generates_uint8_images_and_is_deterministic(tiny):
    assert isinstance(tiny, ImageGenerator)
    a = _gen(tiny, [0, 1, 2])
    assert len(a) == 3 and all(x.shape == (32, 32, 3) and x.dtype == np.uint8 for x in a)
    b = _gen(tiny, [0, 1, 2])
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same batch composition: bit-exact
    c = tiny.generate([PROMPTS[0]], [SEEDS[0] + 1], [0], ["x"])[0]
    assert np.abs(c.astype(int) - a[0]).mean() > 5  # a different seed gives a different image


def test_image_depends_on_seed_not_on_batching(tiny):
    """Per-image generators make the noise batch-independent; what remains is float rounding of
    batched oneDNN convolutions (measured here: at most 1/255 on ~0.003 % of pixels), so pixels
    match across batch sizes to within one level, and bit for bit for the same batching."""
    ref = _in_batches(tiny, [6])
    for sizes in ([1] * 6, [4, 2], [3, 3], [2, 2, 2]):
        other = _in_batches(tiny, sizes)
        diff = np.abs(other - ref)
        assert diff.max() <= 1, sizes
        assert (diff > 0).mean() < 1e-3, sizes
    # prompt/seed pairing survives batching: swapping the order permutes the images
    swapped = np.stack(_gen(tiny, [5, 4, 3, 2, 1, 0])).astype(np.int16)[::-1]
    assert np.abs(swapped - ref).max() <= 1


def test_identity_names_everything_that_changes_pixels(tiny):
    ident = tiny.identity()
    assert ident["model"] == "tiny" and ident["revision"] == "tiny-sd-v1"
    assert (ident["resolution"], ident["steps"], ident["guidance"]) == (32, 2, 5.0)
    assert "tiny-sd-v1" in ident.values()
    assert not any("/" in str(v) for v in ident.values())  # no machine-specific cache path
    other = make_generator("tiny", resolution=32, steps=3, guidance=5.0).identity()
    assert other != ident


def test_local_folder_loads_like_a_hub_model(tiny):
    folder = tiny.source  # the materialised tiny pipeline is a save_pretrained folder
    g = make_generator(folder, resolution=32, steps=2, guidance=5.0)
    ident = g.identity()
    assert ident["revision"].startswith("files-sha256:") and ident["model"].startswith("dir:")
    assert np.array_equal(g.generate(PROMPTS[:1], SEEDS[:1], [0], ["x"])[0], _gen(tiny, [0])[0])


def test_real_generator_offline_fails_fast_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as e:
        make_generator("stabilityai/stable-diffusion-2-1-base", resolution=512, steps=50,
                       guidance=5.0)
    assert time.perf_counter() - t < 20
    msg = str(e.value)
    assert "\n" not in msg and "not in the Hugging Face cache" in msg and "--generator tiny" in msg


def test_bad_generator_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="no model_index.json"):
        make_generator(str(tmp_path), resolution=32, steps=2, guidance=5.0)
    with pytest.raises(ValueError, match="unknown option"):
        make_generator("tiny", resolution=32, steps=2, guidance=5.0, options={"gapp": 1})
    with pytest.raises(ValueError, match="multiple of 8.*got 30.*steps must be >= 1"):
        DiffusersGenerator("x", resolution=30, steps=0, guidance=5.0, source="x", revision="r")


def test_dtype_policy():
    import torch

    assert resolve_torch_dtype("auto", "cpu") == torch.float32
    assert resolve_torch_dtype("auto", "cuda") == torch.float16  # the paper's fp16 on GPU
    assert resolve_torch_dtype("bf16", "cuda") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_torch_dtype("int8", "cpu")


def test_shapes_generator_gets_its_options():
    pytest.importorskip("regft.shapes")
    g = make_generator("shapes", resolution=32, steps=50, guidance=5.0, options={"gap": 0.5})
    assert isinstance(g, ImageGenerator)
    assert g.identity()["gap"] == 0.5
    imgs = g.generate(["p", "p"], [1, 2], [0, 1], ["red circle", "blue square"])
    assert imgs[0].shape == (32, 32, 3) and imgs[0].dtype == np.uint8


def test_tiny_sdxl_generates_through_the_same_path_as_tiny(tiny, tiny_sdxl):
    """Both load from a saved folder through AutoPipelineForText2Image, which picks the class
    from model_index.json; SDXL's extra inputs (second encoder, size conditioning) are its own."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert tiny_sdxl.identity()["pipeline"] == "StableDiffusionXLPipeline"
    assert tiny.identity()["pipeline"] == "StableDiffusionPipeline"
    a = _gen(tiny_sdxl, [0, 1])
    assert all(x.shape == (32, 32, 3) and x.dtype == np.uint8 for x in a)
    assert np.array_equal(a[0], _gen(tiny_sdxl, [0, 1])[0])  # same seed, same batch: bit-exact
    assert np.abs(a[0].astype(int) - a[1]).mean() > 5
    pipe = tiny_sdxl.load()
    assert type(pipe) is StableDiffusionXLPipeline and pipe.text_encoder_2 is not None
    assert pipe.unet.config.addition_embed_type == "text_time"  # the added time ids
    assert type(tiny.load()) is StableDiffusionPipeline
    # the saved folder, given as a folder, is the same model: same class, same pixels
    g = make_generator(tiny_sdxl.source, resolution=32, steps=2, guidance=5.0)
    assert g.identity()["pipeline"] == "StableDiffusionXLPipeline"
    assert np.array_equal(g.generate(PROMPTS[:1], SEEDS[:1], [0], ["x"])[0], a[0])


@pytest.mark.parametrize("variant", ["tiny", "tiny-sdxl"])
def test_scheduler_and_turbo_guidance_are_used_and_identified(one_thread, variant):
    """--scheduler NAME swaps the model's scheduler for that class (built from the model's own
    scheduler config) and the identity names it; guidance 0 (Turbo's) turns CFG off."""
    base = make_generator(variant, resolution=32, steps=2, guidance=5.0)
    dpm = make_generator(variant, resolution=32, steps=2, guidance=5.0,
                         scheduler="DPMSolverMultistepScheduler")
    assert dpm.identity()["scheduler"]["class"] == "DPMSolverMultistepScheduler"
    assert base.identity()["scheduler"]["class"] == type(base.load().scheduler).__name__
    assert type(dpm.load().scheduler).__name__ == "DPMSolverMultistepScheduler"
    # the config the identity records is the one the loaded scheduler runs with
    assert {k: v for k, v in dpm.load().scheduler.config.items() if not k.startswith("_")} == \
        dpm.identity()["scheduler"]["config"]
    assert np.abs(_gen(dpm, [0])[0].astype(int) - _gen(base, [0])[0]).mean() > 1
    turbo = make_generator(variant, resolution=32, steps=2, guidance=0.0)
    one = make_generator(variant, resolution=32, steps=2, guidance=1.0)
    # guidance <= 1: no unconditional pass, so 0 and 1 are the same conditional-only images
    assert np.array_equal(_gen(turbo, [0])[0], _gen(one, [0])[0])
    assert not np.array_equal(_gen(turbo, [0])[0], _gen(base, [0])[0])


def test_identity_changes_with_every_generation_setting(tiny, tiny_sdxl):
    kw = dict(resolution=32, steps=2, guidance=5.0)
    variants = [tiny.identity(), tiny_sdxl.identity(),
                make_generator("tiny", **{**kw, "steps": 3}).identity(),
                make_generator("tiny", **{**kw, "guidance": 7.5}).identity(),
                make_generator("tiny", **kw, scheduler="EulerDiscreteScheduler").identity(),
                make_generator("tiny", **kw, scheduler="DPMSolverMultistepScheduler").identity()]
    assert len({repr(sorted(v.items())) for v in variants}) == len(variants)
    assert make_generator("tiny", **kw).identity() == tiny.identity()  # and stable


def _pipeline_folder(root, pipeline, vae_blocks=4):
    """A folder with just the configs a generator reads before loading weights (the tiny
    model's scheduler), claiming to be `pipeline`."""
    import json

    (root / "scheduler").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "PNDMScheduler", "skip_prk_steps": True, "steps_offset": 1}))
    (root / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [32] * vae_blocks}))
    return str(root)


def test_settings_a_pipeline_cannot_take_are_refused_before_loading(one_thread, tmp_path):
    kw = dict(resolution=32, steps=2, guidance=5.0)
    with pytest.raises(GeneratorSettingsError) as e:
        make_generator("tiny", **kw, scheduler="NoSuchScheduler")
    assert [f for f, _ in e.value.settings] == ["scheduler"] and "not a diffusers scheduler" in str(e.value)
    with pytest.raises(GeneratorSettingsError, match="does not work with StableDiffusionPipeline"):
        make_generator("tiny", **kw, scheduler="FlowMatchEulerDiscreteScheduler")  # SD3/Flux's
    with pytest.raises(GeneratorSettingsError, match="not a diffusers scheduler"):
        make_generator("tiny", **kw, scheduler="StableDiffusionPipeline")  # a class, not a scheduler
    with pytest.raises(GeneratorSettingsError, match="no scheduler"):
        make_generator("shapes", **kw, scheduler="DDIMScheduler")
    # a VAE that downsamples by 16: 40 px is a multiple of 8, not of 16
    folder = _pipeline_folder(tmp_path / "vae16", "StableDiffusionPipeline", vae_blocks=5)
    with pytest.raises(GeneratorSettingsError, match="multiple of 16.*got 40") as e:
        make_generator(folder, **{**kw, "resolution": 40}, scheduler="NoSuchScheduler")
    assert sorted(f for f, _ in e.value.settings) == ["resolution", "scheduler"]  # all at once
    # a pipeline without classifier-free guidance, one without negative prompts
    nocfg = _pipeline_folder(tmp_path / "nocfg", "QwenImage21Pipeline")
    with pytest.raises(GeneratorSettingsError, match="no classifier-free guidance") as e:
        make_generator(nocfg, **kw)
    assert [f for f, _ in e.value.settings] == ["guidance"]
    make_generator(nocfg, **{**kw, "guidance": 0.0})  # guidance off: accepted
    lcm = _pipeline_folder(tmp_path / "lcm", "LatentConsistencyModelPipeline")
    with pytest.raises(GeneratorSettingsError, match="takes no negative_prompt"):
        make_generator(lcm, **kw, options={"negative_prompt": "blurry"})
    with pytest.raises(ValueError, match="not one diffusers' AutoPipelineForText2Image loads"):
        make_generator(_pipeline_folder(tmp_path / "i2i", "NoSuchPipeline"), **kw)


def test_a_cached_hub_id_loads_offline_by_its_id(tiny_sdxl, tmp_path, monkeypatch):
    """A model id found in the Hugging Face cache (a snapshot folder, as a download leaves it)
    loads offline through the same AutoPipeline path; its revision is the snapshot's commit."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-sdxl"
    shutil.copytree(tiny_sdxl.source, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    g = make_generator("someone/tiny-sdxl", resolution=32, steps=2, guidance=5.0)
    ident = g.identity()
    assert (ident["model"], ident["revision"]) == ("someone/tiny-sdxl", commit)
    assert ident["pipeline"] == "StableDiffusionXLPipeline"
    assert np.array_equal(g.generate(PROMPTS[:1], SEEDS[:1], [0], ["x"])[0], _gen(tiny_sdxl, [0])[0])


def test_native_resolution_of_sdxl_and_of_a_saved_folder(tiny, tiny_sdxl, tmp_path):
    """SDXL is made at 1024 px by default (SD at 512); a saved folder's default is what its
    configs say (UNet sample_size x VAE factor): the tiny folders say 32."""
    from regft.generate import GenerationConfig
    from regft.generators import PAPER_GENERATOR, SDXL_BASE, native_resolution

    assert native_resolution(SDXL_BASE) == 1024 and native_resolution(PAPER_GENERATOR) == 512
    for g in (tiny, tiny_sdxl):
        assert GenerationConfig(generator=g.source).effective_resolution() == 32
    assert native_resolution(str(tmp_path)) == 512  # no UNet config: the SD default
