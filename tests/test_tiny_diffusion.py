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
