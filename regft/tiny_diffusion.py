"""A tiny Stable Diffusion pipeline for offline use, assembled from component configs.

Same class as the real generator (`diffusers.StableDiffusionPipeline`), random weights seeded
per component, 32 px images. The tokenizer is a `transformers.CLIPTokenizer` whose vocabulary
and merges are derived from the BPE file that ships inside open_clip, so it needs no download
(and its token ids match open_clip's). `materialize_tiny_pipeline` saves it once with
`save_pretrained`; the generator then loads it with `from_pretrained(..., local_files_only=True)`,
the same code path as a real model folder. Its images are noise-like: a plumbing check only.
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
TINY_RESOLUTION = 32
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


def build_tiny_pipeline(seed: int = 0):
    """Assemble the tiny pipeline in memory (each component seeded before it is built)."""
    # heavy: see the imports
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    vocab, merges = clip_bpe_vocab_and_merges()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP_CONTEXT_LENGTH)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 32, 32),  # 4 blocks: 3 downsamplings, latents at 1/8
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
    )
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=CLIP_START_TOKEN,
            eos_token_id=CLIP_END_TOKEN,
            pad_token_id=CLIP_END_TOKEN,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=CLIP_VOCAB_SIZE,
            max_position_embeddings=CLIP_CONTEXT_LENGTH,
        )
    )
    scheduler = PNDMScheduler(skip_prk_steps=True, steps_offset=1)  # SD's default scheduler family
    for module in (unet, vae, text_encoder):
        module.eval()  # from_pretrained returns eval-mode modules; match it
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


def default_cache_dir() -> Path:
    root = os.environ.get("REGFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "regft")
    return Path(root)


def materialize_tiny_pipeline(cache_dir: str | Path | None = None) -> Path:
    """Save the tiny pipeline once (atomically) and return its folder."""
    target = Path(cache_dir or default_cache_dir()) / TINY_SD_VERSION
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{TINY_SD_VERSION}.tmp-{os.getpid()}"
    build_tiny_pipeline().save_pretrained(tmp)
    (tmp / "regft_tiny.json").write_text(json.dumps({"version": TINY_SD_VERSION}))
    try:
        os.replace(tmp, target)
    except OSError:  # another process won the race: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return target
