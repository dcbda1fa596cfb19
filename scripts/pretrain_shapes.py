"""Pretrain the tiny shapes CLIP (deterministic; the output is committed).

    .venv/bin/python scripts/pretrain_shapes.py              # writes regft/pretrained/shapes-clip
    .venv/bin/python scripts/pretrain_shapes.py --steps 5 --out /tmp/x --eval-per-class 10

Contrastive (CLIP InfoNCE) training on real-domain shapes images (regft/shapes.py, gap 0) with
captions from `shapes.CAPTION_TEMPLATES`. Each step renders a fresh batch, seeded by (seed, step),
holding one image of each of the 48 colour-shape combinations outside the `shapes` task, plus
each of the task's 16 combinations with probability --target-frequency (default 0: the task's
classes are held out, so the model knows their colours and shapes but has never seen their
names paired with images; its zero-shot errors are then misalignment of names, which labelled
images, even generated ones, can fix; docs/shapes-testbed.md). No combination appears twice in
a batch (no false negatives). Fixed seed, fixed step count, fixed thread count (1): two runs
give identical weights. Writes open_clip's local-folder format (open_clip_config.json +
open_clip_model.safetensors, stored in fp16 to keep it small) and MADE.md, then reloads the
folder through `regft.models.create_clip("local-dir:...")` (the same path as real pretrained
weights) and records its zero-shot accuracy on the real test split.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regft import shapes

# Widths: the text tower's 49408-token embedding table dominates the size (49408 x 32 = 1.6 M
# parameters); a 32-wide text tower is plenty for two-word captions. Context 16 > the longest
# caption (10 tokens with start/end). Image tower: a 4-layer ViT on 4 x 4 patches, ~0.2 M.
MODEL_CFG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 64, "head_width": 16, "patch_size": 4},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
PREPROCESS_CFG = {  # open_clip's defaults (OpenAI mean/std), written out so the folder is explicit
    "size": 32,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}
DEFAULTS = {"steps": 1500, "seed": 0, "lr": 2e-3, "weight_decay": 0.1, "warmup": 100,
            "target_frequency": 0.0}
THREADS = 1  # on a shared 2-core machine one thread is faster than two (no spin-waiting)


def combos() -> list[tuple[str, str]]:
    return [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]


def make_batch(step: int, seed: int, target_frequency: float, tokens: torch.Tensor,
               mean: torch.Tensor, std: torch.Tensor):
    """Images (B, 3, 32, 32) normalised and caption token ids (B, ctx) for one step.

    Every non-target combination once; each of the 16 target-task combinations with probability
    `target_frequency` (they are rare concepts, as a name-only task's classes are on the web).
    """
    rng = np.random.default_rng([seed, step])
    pairs = combos()
    targets = set(shapes.TASK_CLASSES)
    keep = rng.random(len(pairs)) < target_frequency  # drawn for every pair: fixed stream
    chosen = [k for k, (c, s) in enumerate(pairs) if f"{c} {s}" not in targets or keep[k]]
    order = rng.permutation(chosen)
    img_seeds = rng.integers(0, 2**62, size=len(order))
    templates = rng.integers(0, len(shapes.CAPTION_TEMPLATES), size=len(order))
    imgs, toks = [], []
    for j, k in enumerate(order):
        colour, shape = pairs[k]
        imgs.append(shapes.render(f"{colour} {shape}", int(img_seeds[j]), 0.0, 32))
        toks.append(tokens[k, templates[j]])
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, H, W)
    return (x - mean) / std, torch.stack(toks)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def pretrain(steps: int, seed: int, lr: float, weight_decay: float, warmup: int,
             target_frequency: float, log_every: int = 100):
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**MODEL_CFG)
    model.train()
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])
    captions = [[t.format(c=c, s=s) for t in shapes.CAPTION_TEMPLATES] for c, s in combos()]
    tokens = torch.stack([tok(caps) for caps in captions])  # (64, n_templates, ctx)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-6,
    )
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        images, text = make_batch(step, seed, target_frequency, tokens, mean, std)
        img = F.normalize(model.encode_image(images), dim=-1)
        txt = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # (B, B)
        labels = torch.arange(len(img))
        loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():.1f}"
                  f"  {time.time() - t0:.0f}s", flush=True)
    return model, time.time() - t0


def save_folder(model, out: Path) -> str:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": MODEL_CFG, "preprocess_cfg": PREPROCESS_CFG}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    path = out / "open_clip_model.safetensors"
    save_file(state, str(path))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@torch.no_grad()
def zeroshot_accuracy(model_dir: Path, n_per_class: int, split_seed: int = shapes.REAL_TEST_SEED) -> float:
    """Load the folder through create_clip (local-dir) and score the real test split."""
    from regft.metrics import accuracy
    from regft.models import build_classifier, create_clip

    bundle = create_clip(f"local-dir:{model_dir}", None)
    clf = build_classifier(bundle, shapes.shapes_task()).eval()
    images, labels = shapes.render_real_test(n_per_class, split_seed)
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    logits = torch.cat([clf(x[i:i + 512]) for i in range(0, len(x), 512)])
    return accuracy(logits, torch.from_numpy(labels))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/pretrain_shapes.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    p.add_argument("--weight-decay", type=float, default=DEFAULTS["weight_decay"])
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"])
    p.add_argument("--target-frequency", type=float, default=DEFAULTS["target_frequency"],
                   help="probability that a target-task combination is in a step's batch")
    p.add_argument("--out", default=shapes.shapes_pretrained_dir())
    p.add_argument("--eval-per-class", type=int, default=shapes.REAL_TEST_PER_CLASS,
                   help="real test images per class for the recorded zero-shot accuracy")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=THREADS,
                   help="torch threads (recorded; float results may differ across thread counts)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(args.threads)
    warmup = min(args.warmup, args.steps)
    model, seconds = pretrain(args.steps, args.seed, args.lr, args.weight_decay, warmup,
                              args.target_frequency, args.log_every)
    out = Path(args.out)
    digest = save_folder(model, out)
    acc = zeroshot_accuracy(out, args.eval_per_class)
    n_params = sum(p.numel() for p in model.parameters())
    n_visual = sum(p.numel() for p in model.visual.parameters())
    cmd = "scripts/pretrain_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    import open_clip

    made = f"""# shapes-clip: tiny CLIP pretrained on the procedural shapes domain

Made by `.venv/bin/python {cmd.strip()}` (see scripts/pretrain_shapes.py and
docs/shapes-testbed.md). Loads with `regft.models.create_clip(regft.shapes.shapes_model_name(), None)`
(open_clip `local-dir:`).

- Model: open_clip CLIP, config in open_clip_config.json; {n_params / 1e6:.2f} M parameters
  (image tower {n_visual / 1e6:.3f} M), weights stored in fp16 (loaded into fp32).
- Data: real-domain renders (`regft.shapes.render`, gap 0, 32 x 32) of the 64 colour-shape
  combinations: each step one image of each of the 48 combinations outside the `shapes` task,
  and one of each of the 16 task combinations with probability {args.target_frequency} (0: the
  task's classes are held out of pretraining); fresh image seeds per step from numpy
  default_rng([seed, step]); captions from `shapes.CAPTION_TEMPLATES`
  ({len(shapes.CAPTION_TEMPLATES)} templates, one drawn per image).
  Renderer {shapes.SHAPES_VERSION}.
- Training: symmetric InfoNCE, learnable logit scale (clamped to 100), AdamW lr {args.lr},
  betas (0.9, 0.98), weight decay {args.weight_decay} (not on embeddings, gains, biases),
  {warmup} warm-up steps then cosine to 0, grad-norm clip 1.0, {args.threads} torch thread(s),
  seed {args.seed}, steps {args.steps}.
- Time: {seconds:.0f} s of training on {platform.machine()} ({args.threads} thread(s), shared
  2-core machine); torch {torch.__version__}, open_clip {open_clip.__version__}, numpy {np.__version__}.
- Zero-shot accuracy of this folder, loaded through create_clip, on the `shapes` real test split
  ({args.eval_per_class} images per class, seed {shapes.REAL_TEST_SEED}, template
  "{shapes.TEMPLATES[0]}"): **{acc:.4f}**.
- open_clip_model.safetensors sha256: `{digest}`
"""
    (out / "MADE.md").write_text(made, encoding="utf-8")
    print(f"zero-shot real test accuracy {acc:.4f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
