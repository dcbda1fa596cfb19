"""Tiny Stable Diffusion and SDXL pipelines for offline use, assembled from component configs.

`tiny`: the real class of SD 1.5 / 2.1 (`diffusers.StableDiffusionPipeline`); `tiny-sdxl`: SDXL's
(`StableDiffusionXLPipeline`: two text encoders, the second with a projection whose pooled output
and the size conditioning form SDXL's added time ids). Random weights seeded per component, 32 px
images. The tokenizer is a `transformers.CLIPTokenizer` whose vocabulary
and merges are derived from the BPE file that ships inside open_clip, so it needs no download
(and its token ids match open_clip's). `materialize_tiny_pipeline` saves a variant once
with `save_pretrained`; the generator then loads it with
`AutoPipelineForText2Image.from_pretrained(..., local_files_only=True)`, the same code path as a
real model folder. Its images are noise-like: a plumbing check only.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import torch

# diffusers, transformers and open_clip are imported inside the builders: each takes seconds,
# and only materialising the pipeline (once per machine) needs them

TINY_SD_VERSION = "tiny-sd-v1"  # bump when the architecture or seeds below change
TINY_SDXL_VERSION = "tiny-sdxl-v1"  # likewise for build_tiny_sdxl_pipeline
# generator name -> the version that identifies its weights (and names its cache folder)
TINY_VARIANTS = {"tiny": TINY_SD_VERSION, "tiny-sdxl": TINY_SDXL_VERSION}
TINY_RESOLUTION = 32
# SDXL's added time ids: original size (2), crop top-left (2) and target size (2), each embedded
# in TIME_EMBED_DIM values, next to the second text encoder's pooled projection
SDXL_TIME_IDS = 6
TINY_TIME_EMBED_DIM = 8
TINY_TEXT_DIM = 32  # hidden size of each tiny text encoder (and the second one's projection)
# CLIP's byte-level BPE vocabulary (open_clip's tokenizer, `SimpleTokenizer`): 256 byte tokens and
# their 256 end-of-word forms, one token per merge, then the two special tokens. The BPE file's
# first line is a header, and CLIP uses its first 49152 - 256 - 2 merges.
CLIP_BPE_MERGES = 49152 - 256 - 2
CLIP_START_TOKEN, CLIP_END_TOKEN = 49406, 49407  # <|startoftext|>, <|endoftext|>
CLIP_VOCAB_SIZE = 49408  # 2 * 256 bytes + 48894 merges + 2 special tokens
CLIP_CONTEXT_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level BPE alphabet (the standard reversible byte -> printable mapping)
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_bpe_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's 49408-token vocabulary and merges from open_clip's bundled BPE file."""
    from open_clip.tokenizer import default_bpe  # heavy: see the imports

    lines = gzip.open(default_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : CLIP_BPE_MERGES + 1]]  # line 0: the header
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def _tiny_tokenizer():
    from transformers import CLIPTokenizer  # heavy: see the imports

    vocab, merges = clip_bpe_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)


def _tiny_unet(cross_attention_dim: int, **sdxl):
    from diffusers import UNet2DConditionModel  # heavy: see the imports

    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        norm_num_groups=8,
        **sdxl,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL  # heavy: see the imports

    return AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),  # 4 blocks: 3 downsamplings, latents at 1/8
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )


def _tiny_text_config(**extra):
    from transformers import CLIPTextConfig  # heavy: see the imports

    return CLIPTextConfig(
        bos_token_id=CLIP_START_TOKEN,
        eos_token_id=CLIP_END_TOKEN,
        pad_token_id=CLIP_END_TOKEN,
        hidden_size=TINY_TEXT_DIM,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=CLIP_VOCAB_SIZE,
        max_position_embeddings=CLIP_CONTEXT_LENGTH,
        **extra,
    )


def _eval(*modules):
    for module in modules:
        module.eval()  # from_pretrained returns eval-mode modules; match it


def build_tiny_pipeline(seed: int = 0):
    """Assemble the tiny SD pipeline in memory (each component seeded before it is built)."""
    # heavy: see the imports
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    unet = _tiny_unet(cross_attention_dim=TINY_TEXT_DIM)
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config())
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)  # SD's default scheduler family
    _eval(unet, vae, text_encoder)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sdxl_pipeline(seed: int = 0):
    """Assemble the tiny SDXL pipeline in memory: SDXL's structure at tiny sizes. The UNet's
    cross-attention reads both encoders' hidden states side by side (2 x TINY_TEXT_DIM), and its
    added embedding the time ids plus the second encoder's pooled projection."""
    # heavy: see the imports
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tiny_tokenizer()
    torch.manual_seed(seed)
    unet = _tiny_unet(
        cross_attention_dim=2 * TINY_TEXT_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=SDXL_TIME_IDS * TINY_TIME_EMBED_DIM + TINY_TEXT_DIM,
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,  # as SDXL's UNet
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_tiny_text_config())
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(projection_dim=TINY_TEXT_DIM))
    # SDXL's default scheduler and its published settings
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    _eval(unet, vae, text_encoder, text_encoder_2)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,  # SDXL's two tokenizers share CLIP's BPE (read once)
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


BUILDERS = {"tiny": build_tiny_pipeline, "tiny-sdxl": build_tiny_sdxl_pipeline}


def default_cache_dir() -> Path:
    root = os.environ.get("REGFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "regft")
    return Path(root)


def materialize_tiny_pipeline(cache_dir: str | Path | None = None, variant: str = "tiny") -> Path:
    """Save the tiny pipeline `variant` (TINY_VARIANTS) once (atomically) and return its folder."""
    version = TINY_VARIANTS[variant]
    target = Path(cache_dir or default_cache_dir()) / version
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{version}.tmp-{os.getpid()}"
    BUILDERS[variant]().save_pretrained(tmp)
    (tmp / "regft_tiny.json").write_text(json.dumps({"version": version}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
