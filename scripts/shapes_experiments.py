"""Research harness for the shapes testbed: fine-tune on generated images, sweep alpha, VC on/off.

    .venv/bin/python scripts/shapes_experiments.py --gap 1.0 --lr 3e-4 --seeds 0 1 2
    .venv/bin/python scripts/shapes_experiments.py --gap 0 0.5 1 --vc-weight 0 0.16 --json out.jsonl

Single process, plain torch, the project's pure modules (losses.vc_loss, ensemble.interpolate,
models.build_classifier, metrics). Not the production loop (regft.engine / regft.train): it
exists to measure the testbed (docs/shapes-testbed.md). Runs the cartesian product of the list
arguments; prints one JSON line per run and a mean / spread summary per setting.

Per run (seed s): generate `images_per_class` images per class with ShapesGenerator(gap), item
seeds from regft.prompts.make_items(base_seed=s); split train/val by a sha256 of the item id
(10 % val, the dataset store's rule); fine-tune the zero-shot-initialised classifier (AdamW,
weight decay 0.1, linear warm-up then cosine, grad-norm clip 1.0, open_clip's train transform =
RandomResizedCrop scale 0.9-1.0, loss CE + VC on the image embeddings); then for every alpha
score theta(alpha) on the generated val split (selection) and on the real test split (report
only). alpha is selected on generated-val accuracy by the one-standard-error rule (smallest alpha
within one binomial SE of the best; `select_alpha`); the plain argmax is reported too.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from regft import shapes
from regft.ensemble import alpha_grid, interpolate
from regft.losses import vc_loss
from regft.metrics import accuracy, diversity_scores
from regft.models import build_classifier, create_clip
from regft.prompts import make_items

VC_SPACES = ("raw", "sphere")  # raw: encode_image output (the paper); sphere: sqrt(d) * unit vector


def split_of(item_id: str, val_fraction: float = 0.1) -> str:
    h = int.from_bytes(hashlib.sha256(item_id.encode()).digest()[:8], "big") / 2**64
    return "val" if h < val_fraction else "train"


def generated_split(gap: float, images_per_class: int, seed: int):
    """(train_images, train_labels, val_images, val_labels) as uint8 arrays / int64 tensors."""
    task = shapes.shapes_task()
    items = make_items(task.name, task.gen_names, task.generation_template, images_per_class, seed)
    gen = shapes.ShapesGenerator(32, gap)
    imgs = gen.generate([i.prompt for i in items], [i.seed for i in items],
                        [i.label for i in items], [i.classname for i in items])
    out = {"train": ([], []), "val": ([], [])}
    for item, img in zip(items, imgs):
        split = split_of(item.item_id)
        out[split][0].append(img)
        out[split][1].append(item.label)
    return tuple(x for s in ("train", "val") for x in (np.stack(out[s][0]), torch.tensor(out[s][1])))


def to_tensor(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Eval preprocessing at native 32 px (open_clip's resize + centre crop is the identity)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    return (x - mean) / std


@torch.no_grad()
def predict(clf, x: torch.Tensor, batch: int = 800):
    clf.eval()
    logits, feats = zip(*(clf(x[i:i + batch], return_features=True) for i in range(0, len(x), batch)))
    return torch.cat(logits), torch.cat(feats)


def lr_at(step: int, steps: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def finetune(clf, bundle, train_images, train_labels, *, lr, steps, batch_size, warmup,
             vc_weight, vc_cov_ratio, vc_space, seed):
    """Fine-tune clf in place. Returns a log of mean per-step statistics."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # RandomResizedCrop draws from the global torch RNG
    pil = [Image.fromarray(a) for a in train_images]
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=0.1)
    n = len(pil)
    perm, pos = torch.randperm(n, generator=g), 0
    log = {"ce": 0.0, "vc_v": 0.0, "vc_c": 0.0, "z_std": 0.0}
    clf.train()
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        x = torch.stack([bundle.preprocess_train(pil[i]) for i in idx.tolist()])
        y = train_labels[idx]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        logits, z = clf(x, return_features=True)  # z: (B, d) before normalisation
        ce = F.cross_entropy(logits, y)
        zv = z if vc_space == "raw" else F.normalize(z, dim=-1) * math.sqrt(z.shape[1])
        vc = vc_loss(zv, vc_weight, vc_cov_ratio)
        loss = ce + vc.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
        opt.step()
        log["ce"] += ce.item() / steps
        log["vc_v"] += vc.variance.item() / steps
        log["vc_c"] += vc.covariance.item() / steps
        log["z_std"] += z.detach().std(dim=0).mean().item() / steps
    clf.eval()
    return log


def select_alpha(curve: list[tuple[float, float]], n_val: int, rule: str = "1se") -> float:
    """Pick alpha from (alpha, generated-val accuracy) pairs.

    argmax: the best accuracy, ties to the smaller alpha. 1se: the smallest alpha whose accuracy
    is within one binomial standard error (of the best, on n_val images) of the best — Breiman's
    one-standard-error rule, preferring the model closest to zero-shot among those the
    validation set cannot tell apart.
    """
    best = max(v for _, v in curve)
    tol = 1e-12 if rule == "argmax" else math.sqrt(max(best * (1 - best), 1e-12) / n_val)
    return min(a for a, v in curve if v >= best - tol)


def run_one(bundle, cfg: dict, data: dict) -> dict:
    t0 = time.time()
    task = shapes.shapes_task()
    bundle.model.load_state_dict(data["pretrained"])  # the classifier shares (and trains) .visual
    clf = build_classifier(bundle, task)
    theta_0 = copy.deepcopy(clf.state_dict())
    mean, std = data["mean"], data["std"]
    tr_x, tr_y, va_x, va_y = data["gen"]
    val_x, test_x = to_tensor(va_x, mean, std), data["test_x"]
    log = finetune(clf, bundle, tr_x, tr_y, lr=cfg["lr"], steps=cfg["steps"],
                   batch_size=cfg["batch_size"], warmup=cfg["warmup"], vc_weight=cfg["vc_weight"],
                   vc_cov_ratio=cfg["vc_cov_ratio"], vc_space=cfg["vc_space"], seed=cfg["seed"])
    t_train = time.time() - t0
    theta_1 = copy.deepcopy(clf.state_dict())
    curve = []
    for alpha in cfg["alphas"]:
        clf.load_state_dict(interpolate(theta_0, theta_1, alpha))
        val_logits, _ = predict(clf, val_x)
        test_logits, test_feats = predict(clf, test_x)
        row = {"alpha": alpha, "gen_val": accuracy(val_logits, va_y),
               "real_test": accuracy(test_logits, data["test_y"])}
        if alpha in (0.0, 1.0):
            row.update({f"real_{k}": v for k, v in diversity_scores(test_feats).items()})
            row["real_norm"] = test_feats.norm(dim=-1).mean().item()
        curve.append(row)
    by_alpha = {r["alpha"]: r for r in curve}
    pairs = [(r["alpha"], r["gen_val"]) for r in curve]
    sel = select_alpha(pairs, len(va_y), "1se")
    sel_max = select_alpha(pairs, len(va_y), "argmax")
    oracle = max(curve, key=lambda r: (r["real_test"], -r["alpha"]))
    return {
        **{k: v for k, v in cfg.items() if k != "alphas"},
        "zs_real": by_alpha[0.0]["real_test"], "ft_real": by_alpha[1.0]["real_test"],
        "zs_gen_val": by_alpha[0.0]["gen_val"], "ft_gen_val": by_alpha[1.0]["gen_val"],
        "sel_alpha": sel, "ens_real": by_alpha[sel]["real_test"], "n_gen_val": len(va_y),
        "argmax_alpha": sel_max, "argmax_ens_real": by_alpha[sel_max]["real_test"],
        "oracle_alpha": oracle["alpha"], "oracle_real": oracle["real_test"],
        "train_log": log, "curve": curve, "train_s": round(t_train, 1),
        "total_s": round(time.time() - t0, 1),
    }


SUMMARY_KEYS = ("zs_real", "ft_real", "ens_real", "sel_alpha", "argmax_ens_real", "argmax_alpha",
                "oracle_real", "oracle_alpha")


def summarize(rows: list[dict], group_keys: list[str]) -> list[str]:
    lines = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in group_keys), []).append(r)
    for key, rs in groups.items():
        parts = [f"{k}={v}" for k, v in zip(group_keys, key)] + [f"n={len(rs)}"]
        for k in SUMMARY_KEYS:
            vals = [r[k] for r in rs]
            parts.append(f"{k} {statistics.mean(vals):.3f} [{min(vals):.3f},{max(vals):.3f}]")
        gain = [r["ens_real"] - max(r["zs_real"], r["ft_real"]) for r in rs]
        parts.append(f"gain {statistics.mean(gain):+.3f} [min {min(gain):+.3f}]")
        lines.append("  ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/shapes_experiments.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="open_clip model name (default: shipped shapes CLIP)")
    p.add_argument("--gap", type=float, nargs="+", default=[1.0])
    p.add_argument("--lr", type=float, nargs="+", default=[3e-4])
    p.add_argument("--steps", type=int, nargs="+", default=[150])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--images-per-class", type=int, nargs="+", default=[100])
    p.add_argument("--vc-weight", type=float, nargs="+", default=[0.0])
    p.add_argument("--vc-cov-ratio", type=float, nargs="+", default=[0.125])
    p.add_argument("--vc-space", choices=VC_SPACES, nargs="+", default=["raw"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alpha-step", type=float, default=0.1)
    p.add_argument("--test-per-class", type=int, default=shapes.REAL_TEST_PER_CLASS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    bundle = create_clip(args.model or shapes.shapes_model_name(), None)
    cfg_pre = bundle.preprocess_train.transforms[-1]  # Normalize
    mean = torch.tensor(cfg_pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg_pre.std).view(1, 3, 1, 1)
    pretrained = copy.deepcopy(bundle.model.state_dict())
    test_imgs, test_y = shapes.render_real_test(args.test_per_class, shapes.REAL_TEST_SEED)
    test_x = to_tensor(test_imgs, mean, std)
    alphas = alpha_grid(args.alpha_step)
    grid_keys = ["gap", "lr", "steps", "images_per_class", "vc_weight", "vc_cov_ratio", "vc_space"]
    grid = list(itertools.product(args.gap, args.lr, args.steps, args.images_per_class,
                                  args.vc_weight, args.vc_cov_ratio, args.vc_space))
    gen_cache: dict = {}
    rows = []
    for values in grid:
        for seed in args.seeds:
            cfg = dict(zip(grid_keys, values), seed=seed, batch_size=args.batch_size,
                       warmup=args.warmup, alphas=alphas)
            key = (cfg["gap"], cfg["images_per_class"], seed)
            if key not in gen_cache:
                gen_cache[key] = generated_split(*key)
            data = {"gen": gen_cache[key], "test_x": test_x, "test_y": torch.from_numpy(test_y),
                    "mean": mean, "std": std, "pretrained": pretrained}
            row = run_one(bundle, cfg, data)
            rows.append(row)
            line = json.dumps(row)
            if args.json:
                with open(args.json, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                     if k not in ("curve", "train_log", "alphas")}
            print(json.dumps(short), flush=True)
    varying = [k for k, vals in zip(grid_keys, zip(*grid)) if len(set(vals)) > 1] or ["gap"]
    print("\n".join(summarize(rows, varying)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
