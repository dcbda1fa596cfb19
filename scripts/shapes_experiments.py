"""Research harness for the shapes testbed: fine-tune on generated images, sweep alpha, VC on/off.

    .venv/bin/python scripts/shapes_experiments.py --gap 0.5 --lr 1e-3 --seeds 0 1 2
    .venv/bin/python scripts/shapes_experiments.py --gap 0 0.5 1 --vc-weight 0 0.16 --json out.jsonl
    .venv/bin/python scripts/shapes_experiments.py --gap 0.5 --collapse 0 1 --vc-weight 0 0.16 1.6

Single process, the production training loop: `regft.loop.fit` (the epochs, the best-epoch
rule, the lr schedule and the alpha choice of the Ray Train worker, regft.train) with the
settings of a `regft.train.TrainConfig`. What this script adds is only the testbed: generated
images rendered in memory instead of a stored dataset, the rendered real test split, and a
summary. Runs the cartesian product of the list arguments; prints one JSON line per run and a
mean / [min, max] summary per setting (docs/shapes-testbed.md).

Per run (seed s): generate `images_per_class` images per class with ShapesGenerator(gap, collapse), item
seeds from regft.prompts.make_items(base_seed=s), split into train / generated val by the
store's rule (regft.store.split_of, 10 %); `fit` with seed s (shuffle and augmentation); alpha
is chosen on generated val by the knee rule (TrainConfig's default); the real test curve is
swept after the choice and only reported. 1se and argmax are applied to the same generated-val
curve, and the oracle (best alpha on the real test split) is reported as an upper bound.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time

import numpy as np
import torch

from regft import shapes
from regft.engine import EvalSet, evaluate, select_alpha, split_clip_transform
from regft.ensemble import alpha_grid, interpolate
from regft.loop import ArrayImages, fit
from regft.metrics import diversity_direction, diversity_scores
from regft.models import build_classifier, create_clip
from regft.prompts import make_items
from regft.store import split_of
from regft.train import TrainConfig

GENERATED_RESOLUTION = 32  # the shipped shapes CLIP's input size: rendered at native size
VAL_FRACTION = TrainConfig.val_fraction  # the store's generated-val share


def generated_split(gap: float, collapse: float, images_per_class: int, seed: int):
    """(train_images, train_labels, val_images, val_labels): uint8 (N, H, W, 3) and int arrays."""
    task = shapes.shapes_task()
    items = make_items(task.name, task.gen_names, task.generation_template, images_per_class, seed)
    gen = shapes.ShapesGenerator(GENERATED_RESOLUTION, gap, collapse)
    imgs = gen.generate([i.prompt for i in items], [i.seed for i in items],
                        [i.label for i in items], [i.classname for i in items])
    out = {"train": ([], []), "val": ([], [])}
    for item, img in zip(items, imgs):
        split = split_of(item.item_id, VAL_FRACTION)
        out[split][0].append(img)
        out[split][1].append(item.label)
    return tuple(x for s in ("train", "val") for x in (np.stack(out[s][0]), np.array(out[s][1])))


def within_class_direction(feats: torch.Tensor, labels: list[int]) -> float:
    """Mean over classes of the direction diversity of one class's features: what a collapse of
    the images of one prompt lowers (the all-class score is dominated by the class differences)."""
    y = torch.as_tensor(labels)
    return statistics.mean(diversity_direction(feats[y == c]) for c in y.unique())


def real_diversity(model, theta_0, theta_1, test: EvalSet, eval_tf, alphas) -> dict:
    """Diversity of the real test split's embeddings at each alpha (the VC section's columns)."""
    out = {}
    for alpha in alphas:
        model.load_state_dict(interpolate(theta_0, theta_1, alpha))
        res = evaluate(model, test.batches("cpu", eval_tf.mean, eval_tf.std))
        out.update({f"real_{k}@{alpha:g}": v for k, v in diversity_scores(res.features).items()})
        out[f"real_within_direction@{alpha:g}"] = within_class_direction(res.features,
                                                                         test.dataset.labels)
        out[f"real_norm@{alpha:g}"] = res.features.norm(dim=-1).mean().item()
    return out


def generated_diversity(model, theta_0, images: ArrayImages, eval_tf, batch_size: int) -> dict:
    """Within-class direction diversity of the generated train images as the pretrained CLIP sees
    them: how much the collapse knob took away, before any fine-tuning."""
    model.load_state_dict(theta_0)
    res = evaluate(model, EvalSet(images, batch_size=batch_size).batches("cpu", eval_tf.mean,
                                                                          eval_tf.std))
    return {"gen_within_direction@0": within_class_direction(res.features, images.labels)}


def run_one(bundle, pretrained: dict, cfg: TrainConfig, gap: float, collapse: float,
            images_per_class: int, test: EvalSet, gen: tuple) -> dict:
    t0 = time.time()
    bundle.model.load_state_dict(pretrained)  # the classifier shares (and trains) .visual
    model = build_classifier(bundle, shapes.shapes_task())
    train_tf = split_clip_transform(bundle.preprocess_train)
    eval_tf = split_clip_transform(bundle.preprocess_eval)
    tr_x, tr_y, va_x, va_y = gen
    evals = {"synthetic_val": EvalSet(ArrayImages(va_x, va_y, eval_tf.pil), batch_size=cfg.eval_batch_size),
             "real_test": test}
    result = fit(model, ArrayImages(tr_x, tr_y, train_tf.pil), evals, cfg, eval_tf,
                 report_splits=["real_test"])
    gen_val, real = result.choice.curve, dict(result.curves["real_test"])
    rules = {r: select_alpha(gen_val, r, n_val=len(va_y)) for r in ("knee", "1se", "argmax")}
    oracle = max(real, key=lambda a: (real[a], -a))
    return {
        "gap": gap, "collapse": collapse, "lr": cfg.lr, "epochs": cfg.epochs,
        "images_per_class": images_per_class,
        "vc_weight": cfg.vc_weight, "vc_cov_ratio": cfg.vc_cov_ratio, "seed": cfg.seed,
        "zs_real": real[0.0], "ft_real": real[1.0], "zs_gen_val": dict(gen_val)[0.0],
        "ft_gen_val": dict(gen_val)[1.0], "best_epoch": result.best_epoch, "n_gen_val": len(va_y),
        "n_train": len(tr_y), **{f"{r}_alpha": a for r, a in rules.items()},
        **{f"{r}_real": real[a] for r, a in rules.items()},
        "oracle_alpha": oracle, "oracle_real": real[oracle],
        "train_log": [{"epoch": e.epoch, **e.stats.mean, **e.accuracy} for e in result.epochs],
        "curve": [{"alpha": a, "gen_val": v, "real_test": real[a]} for a, v in gen_val],
        **real_diversity(model, result.theta_0, result.theta_1, test, eval_tf,
                         sorted({0.0, rules["knee"], 1.0})),
        **generated_diversity(model, result.theta_0, ArrayImages(tr_x, tr_y, eval_tf.pil), eval_tf,
                              cfg.eval_batch_size),
        "total_s": round(time.time() - t0, 1),
    }


SUMMARY_KEYS = ("zs_real", "ft_real", "knee_alpha", "knee_real", "1se_alpha", "1se_real",
                "argmax_alpha", "argmax_real", "oracle_alpha", "oracle_real")


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
        for rule in ("knee", "oracle"):
            gain = [r[f"{rule}_real"] - max(r["zs_real"], r["ft_real"]) for r in rs]
            parts.append(f"{rule} gain {statistics.mean(gain):+.3f} [min {min(gain):+.3f}]")
        lines.append("  ".join(parts))
    return lines


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="scripts/shapes_experiments.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="open_clip model name (default: shipped shapes CLIP)")
    p.add_argument("--gap", type=float, nargs="+", default=[1.0])
    p.add_argument("--collapse", type=float, nargs="+", default=[0.0],
                   help="diversity collapse of the generated images in [0, 1] (ShapesGenerator)")
    p.add_argument("--lr", type=float, nargs="+", default=[3e-4])
    p.add_argument("--epochs", type=int, nargs="+", default=[13], help="13 x 11 steps ~ 150 steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--warmup", type=int, default=15, help="warm-up steps (10 %% of ~150)")
    p.add_argument("--images-per-class", type=int, nargs="+", default=[100])
    p.add_argument("--vc-weight", type=float, nargs="+", default=[0.0])
    p.add_argument("--vc-cov-ratio", type=float, nargs="+", default=[d.vc_cov_ratio])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--alpha-step", type=float, default=0.1)
    p.add_argument("--test-per-class", type=int, default=shapes.REAL_TEST_PER_CLASS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="append one JSON line per run to this file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    model_name = args.model or shapes.shapes_model_name()
    bundle = create_clip(model_name, None)
    pretrained = copy.deepcopy(bundle.model.state_dict())
    eval_tf = split_clip_transform(bundle.preprocess_eval)
    test_imgs, test_y = shapes.render_real_test(args.test_per_class, shapes.REAL_TEST_SEED)
    test = EvalSet(ArrayImages(test_imgs, test_y, eval_tf.pil))  # decoded once, reused by every run
    grid_keys = ["gap", "collapse", "lr", "epochs", "images_per_class", "vc_weight", "vc_cov_ratio"]
    grid = list(itertools.product(args.gap, args.collapse, args.lr, args.epochs,
                                  args.images_per_class, args.vc_weight, args.vc_cov_ratio))
    gen_cache: dict = {}
    rows = []
    for (gap, collapse, lr, epochs, per_class, vc_weight, vc_ratio), seed in \
            itertools.product(grid, args.seeds):
        cfg = TrainConfig(task="shapes", model=model_name, pretrained=None, lr=lr,
                          batch_size=args.batch_size, epochs=epochs, warmup_steps=args.warmup,
                          vc_weight=vc_weight, vc_cov_ratio=vc_ratio,
                          alpha_grid=alpha_grid(args.alpha_step), seed=seed)
        key = (gap, collapse, per_class, seed)
        if key not in gen_cache:
            gen_cache[key] = generated_split(*key)
        row = run_one(bundle, pretrained, cfg, gap, collapse, per_class, test, gen_cache[key])
        rows.append(row)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()
                 if k not in ("curve", "train_log")}
        print(json.dumps(short), flush=True)
    varying = [k for k, vals in zip(grid_keys, zip(*grid)) if len(set(vals)) > 1] or ["gap"]
    print("\n".join(summarize(rows, varying)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
