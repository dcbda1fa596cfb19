import numpy as np
import open_clip
import torch

from regft.tiny_diffusion import build_tiny_pipeline, materialize_tiny_pipeline


def _gen(pipe, prompts, seeds):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                generator=gens, output_type="np").images


def test_tokenizer_matches_open_clip():
    pipe = build_tiny_pipeline()
    text = "a photo of a 2012 Audi TTS Coupe, a type of car."
    ids = pipe.tokenizer(text).input_ids
    ref = open_clip.get_tokenizer("ViT-B-16")([text])[0].tolist()
    assert ids == ref[: len(ids)] and ref[len(ids)] == 0


def test_save_load_roundtrip_and_seed_purity(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = materialize_tiny_pipeline(tmp_path)
    assert materialize_tiny_pipeline(tmp_path) == folder  # second call reuses the folder
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    a = _gen(pipe, ["a cat", "a dog"], [1, 2])
    b = _gen(build_tiny_pipeline(), ["a cat", "a dog"], [1, 2])
    np.testing.assert_array_equal(a, b)
    # an image depends on its own (prompt, seed) only, not on the rest of the batch
    single = _gen(pipe, ["a dog"], [2])
    np.testing.assert_allclose(single[0], a[1], atol=1e-5)
    assert a.shape == (2, 32, 32, 3)
    assert not np.allclose(a[0], a[1])


def test_tiny_sdxl_saves_and_loads_through_the_auto_pipeline(tmp_path):
    """tiny-sdxl is SDXL's structure: two text encoders (the second with a projection) whose
    pooled output joins the size conditioning in the UNet's added embedding; saved once, loaded
    by AutoPipelineForText2Image as SDXL, same pixels as the in-memory build."""
    from diffusers import AutoPipelineForText2Image, StableDiffusionXLPipeline

    from regft.tiny_diffusion import SDXL_TIME_IDS, TINY_TIME_EMBED_DIM, build_tiny_sdxl_pipeline

    folder = materialize_tiny_pipeline(tmp_path, variant="tiny-sdxl")
    # its own folder (named by its version, not tiny's); a second call reuses it
    assert folder.name == "tiny-sdxl-v1"
    assert materialize_tiny_pipeline(tmp_path, variant="tiny-sdxl") == folder
    pipe = AutoPipelineForText2Image.from_pretrained(folder, local_files_only=True)
    assert type(pipe) is StableDiffusionXLPipeline
    pipe.set_progress_bar_config(disable=True)
    proj = pipe.text_encoder_2.config.projection_dim
    assert pipe.unet.add_embedding.linear_1.in_features == SDXL_TIME_IDS * TINY_TIME_EMBED_DIM + proj
    a = _gen(pipe, ["a cat", "a dog"], [1, 2])
    built = build_tiny_sdxl_pipeline()
    built.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(a, _gen(built, ["a cat", "a dog"], [1, 2]))
    np.testing.assert_allclose(_gen(pipe, ["a dog"], [2])[0], a[1], atol=1e-5)  # seed purity
    assert a.shape == (2, 32, 32, 3) and not np.allclose(a[0], a[1])
