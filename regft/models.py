"""CLIP model factory: open_clip model + train/eval transforms + tokenizer.

- Real models: any open_clip name + pretrained tag (default ViT-B-16 / openai). Weights come
  from the local Hugging Face cache when present; otherwise they are downloaded. With no network
  (or HF_HUB_OFFLINE=1) and nothing cached, `WeightsUnavailable` is raised within seconds with a
  one-line message, instead of a minute of hub retries and a traceback.
- `local-dir:PATH`: a folder with open_clip_config.json + weights (open_clip's own loader).
- `tiny`: a ~3.4 M-parameter CLIP (32 px images) built from `data/model_configs/regft-tiny.json`,
  registered with open_clip at run time, randomly initialised from a seed. For tests and the
  offline demo; its numbers are noise.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from regft.cli import entry_point
from regft.errors import UserError, WeightsUnavailable
from regft.hub import cached_open_clip_checkpoint, hub_reachable
from regft.zeroshot import ImageClassifier, zeroshot_head

TINY_NAME = "regft-tiny"
TINY_ALIASES = {"tiny", TINY_NAME}
# exp(logit_scale) of a model without one: CLIP clamps its learned scale at 100, where trained
# CLIP models sit
FALLBACK_LOGIT_SCALE = 100.0


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess_train: object  # PIL image -> tensor, with the paper's augmentation
    preprocess_eval: object  # PIL image -> tensor, resize + center crop
    tokenizer: object
    model_name: str
    pretrained: str | None
    image_size: int
    embed_dim: int


# open_clip is imported where it is used: it takes seconds (timm, torchvision models), and
# importing this module for its names (the CLI's weight check, TINY_ALIASES) must stay quick.

def register_tiny_config() -> None:
    import open_clip  # heavy: see above

    if TINY_NAME not in open_clip.list_models():
        cfg_dir = Path(str(resources.files("regft") / "data" / "model_configs"))
        open_clip.add_model_config(cfg_dir)


def check_weights_available(model_name: str, pretrained: str | None, cache_dir: str | None = None):
    """Return (how, value): ('none', None), ('file', path), ('cached', path) or ('download', tag).

    Raises UserError (a ValueError) for an unknown model/tag and WeightsUnavailable when the weights are
    neither on disk nor reachable. Cheap: no download is started here.
    """
    import open_clip  # heavy: see register_tiny_config

    if model_name in TINY_ALIASES or not pretrained or pretrained in ("none", "random"):
        return "none", None
    if model_name.startswith("local-dir:"):
        folder = Path(model_name[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise WeightsUnavailable(
                f"model {model_name}: no open_clip_config.json in {folder} "
                "(a local-dir model needs the config and a weights file)"
            )
        return "none", None
    if model_name not in open_clip.list_models():
        raise UserError(f"unknown model {model_name!r}; e.g. ViT-B-16, ViT-B-32, or 'tiny'")
    if os.path.isfile(pretrained):
        return "file", pretrained
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise UserError(f"unknown pretrained tag {pretrained!r} for {model_name}; known: {tags}")
    if cfg.get("hf_hub"):
        path = cached_open_clip_checkpoint(cfg["hf_hub"], cache_dir)
        if path:
            return "cached", path
    if not hub_reachable():
        where = cfg.get("hf_hub") or cfg.get("url", "?")
        raise WeightsUnavailable(
            f"weights for {model_name}/{pretrained} ({where}) are not cached and the hub cannot "
            "be reached (offline or HF_HUB_OFFLINE=1): download them once on a machine with "
            "network (python -m regft.models --download) and copy the Hugging Face cache, "
            "pass --pretrained /path/to/weights, or use --model tiny"
        )
    return "download", pretrained


def create_clip(
    model_name: str = "ViT-B-16",
    pretrained: str | None = "openai",
    seed: int = 0,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
) -> ClipBundle:
    import open_clip  # heavy: see register_tiny_config

    register_tiny_config()
    how, value = check_weights_available(model_name, pretrained, cache_dir)
    name = TINY_NAME if model_name in TINY_ALIASES else model_name
    kwargs: dict = {"device": device, "cache_dir": cache_dir}
    if how == "none":
        kwargs["pretrained"] = None
    elif how == "download":
        kwargs["pretrained"] = value
    else:
        # A local file: open_clip would not apply the tag's preprocessing and activation, so
        # pass them explicitly (mean/std, interpolation, QuickGELU for OpenAI weights).
        kwargs["pretrained"] = value
        cfg = open_clip.get_pretrained_cfg(name, pretrained) if how == "cached" else {}
        for src, dst in (("mean", "image_mean"), ("std", "image_std"),
                         ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
            if cfg.get(src) is not None:
                kwargs[dst] = cfg[src]
        if cfg.get("quick_gelu"):
            kwargs["force_quick_gelu"] = True
    torch.manual_seed(seed)  # random init (tiny, or heads not in the checkpoint) is seeded
    model, preprocess_train, preprocess_eval = open_clip.create_model_and_transforms(name, **kwargs)
    tokenizer = open_clip.get_tokenizer(name)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    embed_dim = model.text_projection.shape[1] if hasattr(model, "text_projection") else None
    if embed_dim is None:
        embed_dim = model.visual.output_dim
    return ClipBundle(
        model=model,
        preprocess_train=preprocess_train,
        preprocess_eval=preprocess_eval,
        tokenizer=tokenizer,
        model_name=model_name,
        pretrained=pretrained if how != "none" else None,
        image_size=int(image_size),
        embed_dim=int(embed_dim),
    )


@torch.no_grad()
def encode_texts(model, tokenizer, texts_per_class, device="cpu", batch_size=256):
    """Raw text embeddings per class: list of (n_k, d) tensors (for the zero-shot head)."""
    flat = [t for texts in texts_per_class for t in texts]
    out = []
    for i in range(0, len(flat), batch_size):
        tokens = tokenizer(flat[i:i + batch_size]).to(device)
        out.append(model.encode_text(tokens).float().cpu())
    feats = torch.cat(out)
    result, start = [], 0
    for texts in texts_per_class:
        result.append(feats[start:start + len(texts)])
        start += len(texts)
    return result


def logit_scale_of(model) -> float:
    return float(model.logit_scale.exp().item()) if hasattr(model, "logit_scale") else FALLBACK_LOGIT_SCALE


def build_classifier(bundle: ClipBundle, task, device="cpu"):
    """Zero-shot-initialised image classifier (CLIP image tower + head) for a task."""
    feats = encode_texts(bundle.model, bundle.tokenizer, task.zeroshot_texts(), device=device)
    head = zeroshot_head(feats, logit_scale_of(bundle.model))
    return ImageClassifier(bundle.model, head).to(device)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m regft.models",
        description="Check (or download, where the hub is reachable) CLIP weights for offline use.",
    )
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--pretrained", default="openai")
    parser.add_argument("--download", action="store_true",
                        help="build the model once, downloading its weights")
    args = parser.parse_args(argv)
    how, value = check_weights_available(args.model, args.pretrained)
    if args.download:
        bundle = create_clip(args.model, args.pretrained)
        n = sum(t.numel() for t in bundle.model.parameters())
        print(f"{args.model}/{args.pretrained}: ready ({n / 1e6:.1f} M parameters)")
    else:
        print(f"{args.model}/{args.pretrained}: {how} {value or ''}".rstrip())
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())  # the error classes live in regft.errors: one copy even under -m
