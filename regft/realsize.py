"""The paper's real architectures without their weights (`--weights random`; assembly ring).

Stable Diffusion 2.1-base (UNet, VAE, the OpenCLIP ViT-H text tower as diffusers'
`CLIPTextModel`, PNDM scheduler) is built from its published component configs, shipped in
`regft/data/architectures/stable-diffusion-2-1-base/` (source named in SOURCE.md there), with
seeded random weights; the tokenizer is CLIP's BPE from open_clip's bundled file, exactly as
`regft.tiny_diffusion` builds it. The CLIP side needs nothing shipped: open_clip's own config of
`ViT-B-16` with `pretrained=None` is the real architecture (regft.models.create_clip).

What this is for: running the real job at its real dimensions where the weights cannot be had
(offline, nothing cached) -- its costs (time, memory, bytes) are real, its pixels and accuracies
are noise. `build_sd_pipeline(device="meta")` builds the architecture without memory, for counts.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from regft.tiny_diffusion import clip_bpe_vocab_and_merges

# diffusers, transformers and open_clip are imported inside the builders (seconds each)

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
# generator name -> folder of its shipped component configs
ARCHITECTURES = {SD21_BASE: "stable-diffusion-2-1-base"}
# the "revision" of a random-weights pipeline in a dataset's identity: bump when the shipped
# configs or the seeding below change (the images would)
RANDOM_REVISION = "random-weights-v1"
WEIGHTS_CHOICES = ("auto", "pretrained", "random")
RANDOM, PRETRAINED, AUTO = "random", "pretrained", "auto"
# the seed offsets of the components, as in tiny_diffusion: each is built right after its seed
UNET_SEED, VAE_SEED, TEXT_SEED = 0, 1, 2
CLIP_MODEL = "ViT-B-16"  # the paper's CLIP (docs/method.md)


def architecture_dir(generator: str) -> Path:
    return Path(str(resources.files("regft") / "data" / "architectures" / ARCHITECTURES[generator]))


def component_config(generator: str, component: str) -> dict:
    """One shipped config file (unet, vae, text_encoder, scheduler, tokenizer) as a dict."""
    return json.loads((architecture_dir(generator) / f"{component}.json").read_text())


def has_architecture(generator: str) -> bool:
    return generator in ARCHITECTURES


def _text_encoder(cfg: dict):
    from transformers import CLIPTextConfig, CLIPTextModel  # heavy: see the imports

    fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    return CLIPTextModel(CLIPTextConfig(**fields))


def build_components(generator: str = SD21_BASE, seed: int = 0, device: str | torch.device = "cpu"):
    """(unet, vae, text_encoder) of `generator`'s architecture, random weights seeded from
    `seed`; on device "meta" nothing is allocated (parameter counts only)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy: see the imports

    with torch.device(device):
        torch.manual_seed(seed + UNET_SEED)
        unet = UNet2DConditionModel.from_config(component_config(generator, "unet"))
        torch.manual_seed(seed + VAE_SEED)
        vae = AutoencoderKL.from_config(component_config(generator, "vae"))
        torch.manual_seed(seed + TEXT_SEED)
        text_encoder = _text_encoder(component_config(generator, "text_encoder"))
    for module in (unet, vae, text_encoder):
        module.eval()  # as from_pretrained returns them
    return unet, vae, text_encoder


def build_sd_pipeline(generator: str = SD21_BASE, seed: int = 0, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu"):
    """The whole `StableDiffusionPipeline` of `generator`, random weights (see the docstring)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline  # heavy: see the imports
    from transformers import CLIPTokenizer

    unet, vae, text_encoder = build_components(generator, seed, device)
    tok = component_config(generator, "tokenizer")
    vocab, merges = clip_bpe_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=tok["model_max_length"],
                              bos_token=tok["bos_token"], eos_token=tok["eos_token"],
                              pad_token=tok["pad_token"], unk_token=tok["unk_token"])
    scheduler = PNDMScheduler.from_config(component_config(generator, "scheduler"))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    if str(device) != "meta" and dtype != torch.float32:  # built in float32
        pipe = pipe.to(dtype=dtype)
    return pipe


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_counts(generator: str = SD21_BASE, clip_model: str = CLIP_MODEL) -> dict[str, int]:
    """The real architectures' parameter counts, built on the meta device (no memory, ~1 s):
    {unet, vae, text_encoder, clip_visual, clip_total}."""
    import open_clip  # heavy: see the imports

    unet, vae, text_encoder = build_components(generator, device="meta")
    clip = open_clip.create_model(clip_model, pretrained=None, device="meta")
    return {"unet": count(unet), "vae": count(vae), "text_encoder": count(text_encoder),
            "clip_visual": count(clip.visual), "clip_total": count(clip)}
