"""Training throughput: the Ray Train loop (1 and 2 workers) vs a plain single-process loop.

    .venv/bin/python benchmarks/training.py                  # tiny CLIP, 32 px, 2 CPUs (~8 min)
    .venv/bin/python benchmarks/training.py --images 4096 --repeats 1  # quicker, noisier
    # the real size on a GPU (benchmarks/gpu.sh): ViT-B/16, random weights, 224 px, bf16
    python benchmarks/training.py --model ViT-B-16 --image-size 224 --device cuda \
        --precision bf16 --batch-size 128 --runs plain,ray1 --json train.json

Same model (tiny CLIP, zero-shot head), same data (a store-format dataset of PNGs written here),
same epoch (regft.loop.train_epoch over regft.engine.train_step: CE + VC, AdamW, clipping; the
Ray worker runs it too), same global batch. Each side gets
the same CPUs: the plain loop decodes/augments in one DataLoader worker process and trains with
one torch thread; the Ray loop trains in one worker (1 CPU, one thread) while Ray Data
decodes/augments on the remaining CPU; `ray1-worker` is regft.train with `ingest: worker` (the
worker decodes in one DataLoader process on a second CPU it holds, as the plain loop does). The
2-worker run gives each worker 0.5 CPU (the machine
has 2 cores), so it measures DDP + gather overhead on shared cores, not scaling.

Figure of merit: training images/s of an epoch (the `images_per_s` the loop reports: from the
first batch request to the end of the last step, evaluation excluded), median over the epochs
after the first (warm-up); the loops run interleaved `--repeats` times, and the table gives the
min / median / max of it over the repeats with the ratios of the best repeats and of the medians
(other jobs on a shared machine only ever slow a loop down; this VM's speed also drifts between
repeats on its own). Prints a Markdown table to paste under "## Training" in
benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np  # noqa: E402

from regft import raylocal  # noqa: E402

NAMES = [f"class {i}" for i in range(16)]


def write_dataset(path: Path, n_images: int, size: int = 32, shard_size: int = 256) -> str:
    """Random class-coloured squares in the store's format (manifest + parquet shards)."""
    from regft import store as st

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (len(NAMES), 3))
    per_class = math.ceil(n_images / len(NAMES))
    rows = []
    for k in range(len(NAMES)):
        for i in range(per_class):
            img = np.full((size, size, 3), 128, np.uint8)
            x, y = rng.integers(0, size // 2, 2)
            img[y:y + size // 2, x:x + size // 2] = palette[k]
            rows.append((f"{k:04d}-{i:05d}", k, NAMES[k], NAMES[k], i, st.encode_png(img)))
    return st.write_dataset(str(path), rows, "bench", NAMES, shard_size)


RUNS = {"plain": "plain loop (1 process)", "ray1": "Ray Train, 1 worker",
        "ray2": "Ray Train, 2 workers (0.5 CPU each)",
        # the plain loop's own epochs (its DataLoader included) inside one Ray Train worker: what
        # Ray Train costs by itself, apart from the Ray Data ingest regft.train uses
        "ray1-loader": "Ray Train, 1 worker, the plain loop's DataLoader",
        # regft.train with `ingest: worker` (regft.ingest): the worker reads the split and decodes
        # in one DataLoader process on a second CPU it holds, as the plain loop does
        "ray1-worker": "Ray Train, 1 worker, ingest: worker"}  # --runs name -> label


def plain_loop(cfg, dataset_path: str) -> list[float]:
    """The same epochs in one process: a torch DataLoader (1 decode worker) feeding
    regft.loop.train_epoch, the loop the Ray worker runs."""
    import torch

    from regft import engine, loop
    from regft.models import build_classifier, create_clip
    from regft.store import TorchImageDataset
    from regft.train import resolve_train_task

    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    if not cfg.use_gpu:
        torch.set_num_threads(1)  # the Ray worker's one CPU (see the docstring)
    bundle = create_clip(cfg.model, cfg.pretrained, seed=cfg.seed)
    model = build_classifier(bundle, resolve_train_task(cfg), device=device)
    tf = engine.split_clip_transform(bundle.preprocess_train)
    data = TorchImageDataset(dataset_path, "train", tf.to_uint8, cfg.val_fraction)
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                         num_workers=1, persistent_workers=True, prefetch_factor=4)
    opt = engine.build_optimizer(model, cfg.lr, cfg.weight_decay)
    sched = engine.build_scheduler(opt, cfg.warmup_steps, len(loader) * cfg.epochs)
    precision = loop.precision_for(cfg.precision, device)

    def batches():
        for images, labels in loader:
            yield (engine.normalize_uint8(images.to(device, non_blocking=True), tf.mean, tf.std),
                   labels.to(device, non_blocking=True))

    return [loop.train_epoch(model, batches(), opt, sched, vc_weight=cfg.vc_weight,
                             vc_cov_ratio=cfg.vc_cov_ratio, grad_clip=cfg.grad_clip,
                             precision=precision, device=device).images_per_s
            for _ in range(cfg.epochs)]


def ray_loop(cfg, dataset_path: str, storage: str, name: str) -> list[float]:
    import ray.train
    from ray.train import Result

    from regft import checkpoint
    from regft.train import build_trainer

    run_config = ray.train.RunConfig(name=name, storage_path=storage)
    cfg.keep_checkpoints = cfg.epochs + 1
    build_trainer(cfg, dataset_path, run_config).fit()
    rates = {}
    for ckpt, _ in Result.from_path(os.path.join(storage, name)).best_checkpoints:
        with ckpt.as_directory() as d:
            meta = checkpoint.read_meta(d)
        if not meta.final:
            rates[meta.epoch] = meta.metrics.images_per_s
    return [rates[e] for e in sorted(rates)]


def _plain_loop_in_worker(config: dict) -> None:
    import ray.train

    from regft.train import TrainConfig

    rates = plain_loop(TrainConfig.from_dict(config["train"], where="train"), config["dataset"])
    Path(config["out"]).write_text(json.dumps(rates))  # Train keeps metrics only with a checkpoint
    ray.train.report({"epochs": len(rates)})


def ray_loader_loop(cfg, dataset_path: str, storage: str, name: str) -> list[float]:
    """plain_loop, unchanged, as the function of a one-worker TorchTrainer (no Ray Data): the
    worker holds 1 CPU for training and its DataLoader process decodes on the other, as in the
    plain loop."""
    import ray.train
    from ray.train.torch import TorchTrainer

    out = Path(storage, f"{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(_plain_loop_in_worker,
                           train_loop_config={"train": cfg.to_dict(), "dataset": dataset_path,
                                              "out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=cfg.use_gpu,
                                                                  resources_per_worker={"CPU": 1.0}),
                           run_config=ray.train.RunConfig(name=name, storage_path=storage))
    trainer.fit()
    return json.loads(out.read_text())


def steady(rates: list[float]) -> float:
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=12288)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model", default="tiny", help="open_clip architecture (ViT-B-16: the paper's)")
    p.add_argument("--pretrained", default=None, help="weights tag (default none: random weights)")
    p.add_argument("--image-size", type=int, default=32, help="px of the dataset's PNGs")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--precision", default="auto", help="auto, fp32, bf16, fp16 (TrainConfig)")
    p.add_argument("--runs", default="plain,ray1,ray2",
                   help=f"comma-separated subset of {', '.join(RUNS)}")
    p.add_argument("--json", help="also write the figures as JSON to this file")
    args = p.parse_args(argv)
    unknown = [r for r in args.runs.split(",") if r not in RUNS]
    if unknown:
        p.error(f"--runs: unknown {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    wanted = ["plain", "ray1"] + [r for r in args.runs.split(",")
                                  if r in ("ray2", "ray1-loader", "ray1-worker")]

    import ray
    import torch

    from regft.train import TrainConfig

    # the dashboard (state API) must be up: without it Ray Train V2's placement-group cleaner can
    # take a live run for dead and remove its workers' placement group (seen with 2 workers)
    gpu = args.device == "cuda"
    # 2 CPUs: this machine's count, and what the docstring's comparison gives each side
    raylocal.init("local", num_cpus=None if gpu else 2, quiet=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory(prefix="regft-bench-") as tmp:
        t0 = time.perf_counter()
        names_file = Path(tmp, "classes.txt")
        names_file.write_text("\n".join(NAMES) + "\n")
        dataset = write_dataset(Path(tmp, "ds"), args.images, args.image_size)
        print(f"dataset: {args.images} images ({args.image_size} px PNG) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)

        def cfg(workers: int, cpus: float, ingest: str = "ray_data") -> TrainConfig:
            return TrainConfig(task="bench", classnames=str(names_file), model=args.model,
                               pretrained=args.pretrained, epochs=args.epochs,
                               batch_size=args.batch_size, lr=1e-4, warmup_steps=10,
                               alpha_grid=[0.0, 1.0], num_workers=workers, cpus_per_worker=cpus,
                               use_gpu=gpu, precision=args.precision, ingest=ingest, loader_workers=1)

        loops = {
            RUNS["plain"]: lambda r: plain_loop(cfg(1, 1.0), dataset),
            RUNS["ray1"]: lambda r: ray_loop(cfg(1, 1.0), dataset, f"{tmp}/runs", f"w1-{r}"),
            RUNS["ray2"]: lambda r: ray_loop(cfg(2, 0.5), dataset, f"{tmp}/runs", f"w2-{r}"),
            RUNS["ray1-loader"]: lambda r: ray_loader_loop(cfg(1, 1.0), dataset, f"{tmp}/runs",
                                                           f"loader-{r}"),
            RUNS["ray1-worker"]: lambda r: ray_loop(cfg(1, 1.0, "worker"), dataset, f"{tmp}/runs",
                                                    f"worker-{r}"),
        }
        loops = {RUNS[k]: loops[RUNS[k]] for k in wanted}
        results: dict[str, list[list[float]]] = {name: [] for name in loops}
        for r in range(args.repeats):  # interleaved, so load changes hit every loop alike
            for name, fn in loops.items():
                results[name].append(fn(r))
                print(name, [round(x) for x in results[name][-1]], os.getloadavg(), file=sys.stderr)
    ray.shutdown()

    spread = {name: sorted(steady(rates) for rates in runs) for name, runs in results.items()}
    best = {name: s[-1] for name, s in spread.items()}
    middle = {name: statistics.median(s) for name, s in spread.items()}
    base, one = best["plain loop (1 process)"], best["Ray Train, 1 worker"]
    where = torch.cuda.get_device_name(0) if gpu else f"{os.cpu_count()} CPUs"
    print(f"{args.images} images x {args.epochs} epochs, global batch {args.batch_size}, "
          f"{args.model} CLIP ({args.pretrained or 'random'} weights, {args.image_size} px, "
          f"precision {args.precision}), {where}, {args.repeats} interleaved repeats; steady = "
          f"median of epochs 2..{args.epochs}; min / median / max of it over the repeats; "
          f"load average {os.getloadavg()[2]:.1f} (15 min) at the end\n")
    print("| loop | images/s per epoch, each repeat | steady min / median / max | vs plain (best; median) "
          "| vs Ray 1 worker (best) |")
    print("| --- | --- | --- | --- | --- |")
    plain_mid = middle["plain loop (1 process)"]
    for name, runs in results.items():
        per = "; ".join(", ".join(f"{r:.0f}" for r in rates) for rates in runs)
        s = spread[name]
        print(f"| {name} | {per} | {s[0]:.0f} / {middle[name]:.0f} / {s[-1]:.0f} | "
              f"{best[name] / base:.2f}x; {middle[name] / plain_mid:.2f}x | {best[name] / one:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": args.model, "pretrained": args.pretrained, "image_size": args.image_size,
            "device": where, "precision": args.precision, "batch_size": args.batch_size,
            "images": args.images, "epochs": args.epochs, "per_epoch_images_per_s": results,
            "best_steady_images_per_s": best, "median_steady_images_per_s": middle}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
