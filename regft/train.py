"""Fine-tune CLIP on a generated dataset with Ray Train, then weight-space-ensemble it.

    python -m regft.train shapes --dataset DATASET --epochs 2 --batch-size 64 --lr 1e-4
    python -m regft.train cars --dataset ID --real-test ~/data/stanford_cars --use-gpu --num-workers 4

One run = one fine-tune: per-epoch CE + vc_weight * VC on the worker shards of the generated
train split (Ray Data), evaluation on the held-out synthetic split (and a real val split when
given), a checkpoint per epoch (best N kept by the selection metric), then the alpha sweep of the
weight-space ensemble on the selection split. Only then is the real test split opened, and only
to report zero-shot / fine-tuned / ensemble numbers. The same worker loop serves the CLI and
every Ray Tune trial (regft.tune builds the trainer with `build_trainer`).

Reported metrics (docs/ARCHITECTURE.md): per epoch `epoch, train_loss, ce_loss, vc_loss,
vc_variance, vc_covariance, lr, images_per_s, synthetic_val_acc, [real_val_acc], div_magnitude,
div_direction, effective_rank, select_metric`; a final report (with `final: True`) adds
`best_epoch, best_alpha, alpha_curve, selection_metric` and `zs_/ft_/ens_<split>_acc`.
"ft" is the best epoch by the selection metric (the checkpoint the ensemble starts from); the
final report's `select_metric` is the ensemble's value at `best_alpha` (it is one report after
the last epoch, with the ensemble weights as its checkpoint).

Data path: the train split's PNG bytes are read once and kept in the object store
(`cache_train`), globally shuffled every epoch (the store's shards are class-major), decoded and
augmented by a Ray Data map (the PIL part of the model's `preprocess_train`) on CPUs the workers do
not hold, then split evenly over the workers (`get_dataset_shard`, equal shards, incomplete
batches dropped so every rank takes the same number of steps); normalisation runs on the worker's
device. Ray Data therefore needs CPUs of its own: `regft.resources.check_resources` asks for
`DATA_CPUS` beyond num_workers x cpus_per_worker, otherwise Train would wait forever. Validation
splits are small and read by every rank (each evaluates every world-th item; counts are summed).

Checkpoints are plain state dicts (`model.pt`, torch.load(..., weights_only=True)) + `meta.json`
(+ `train_state.pt`: optimizer/scheduler state for resuming). The best `keep_checkpoints` are kept
by `select_metric`; a restarted run (FailureConfig, or a Tune trial) resumes from the latest.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regft.cli import UserError, entry_point
from regft.engine import ALPHA_RULES
from regft.resources import check_resources, cluster_capacity

log = logging.getLogger(__name__)

SELECTION_METRICS = ("synthetic_val", "real_val")
SPLITS = ("synthetic_val", "real_val", "real_test")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_CACHE_BYTES = 4 * 2**30  # per rank: decoded eval images kept in memory up to this size
MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "meta.json"


def default_alpha_grid() -> list[float]:
    from regft.ensemble import alpha_grid

    return alpha_grid(0.1)


@dataclass
class TrainConfig:
    """Every training setting, with the paper's defaults (method.md). The one place defaults live."""

    # task: a catalog name or a class-name file (optionally its first N classes)
    task: str | None = None
    classnames: str | None = None
    max_classes: int | None = None
    # model
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    # optimisation: WiSE-FT recipe (lr is searched; 3e-5 is WiSE-FT's published value)
    lr: float = 3e-5
    weight_decay: float = 0.1
    batch_size: int = 128  # global, split evenly over the workers
    epochs: int = 10
    warmup_steps: int = 500
    grad_clip: float = 1.0
    # VC regularizer: a = vc_weight, b = vc_weight * vc_cov_ratio (paper: 0.16, 0.02)
    vc_weight: float = 0.16
    vc_cov_ratio: float = 0.125
    precision: str = "auto"  # auto: bf16 autocast on GPUs that have it, else fp16; fp32 on CPU
    # ensemble and selection (never on the real test split)
    alpha_grid: list[float] = field(default_factory=default_alpha_grid)
    selection_metric: str = "synthetic_val"  # or real_val (needs real_val)
    # how alpha is picked from the selection split's curve (regft.engine.select_alpha): the
    # knee, because a generated val split keeps rewarding alphas towards 1 (the generated style)
    alpha_rule: str = "knee"
    # after selection, sweep the other splits too (real test included: reported, never used),
    # so the whole accuracy-vs-alpha curve of each split is logged; costs one eval per alpha
    report_alpha_curves: bool = True
    val_fraction: float = 0.1  # generated items held out for synthetic_val (store's sha256 rule)
    real_test: str | None = None  # path (see regft.realdata); reported only
    real_val: str | None = None  # labelled real validation images, for selection_metric real_val
    keep_checkpoints: int = 2
    # Ray Data: keep the train split's PNG bytes in the object store after the first read
    # (about the dataset's size on disk) instead of re-reading parquet every epoch (~4x slower
    # per epoch on a small set, benchmarks/RESULTS.md)
    cache_train: bool = True
    # resources
    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # used when use_gpu
    cpus_per_worker: float = 1.0
    eval_batch_size: int = 256
    seed: int = 0
    audit_log: str | None = None  # JSON-lines record of when each split is opened (tests, audits)

    def validate(self) -> list[str]:
        p = []
        if not self.task and not self.classnames:
            p.append("task: give a task name (e.g. cars) or classnames FILE")
        for name in ("batch_size", "epochs", "num_workers", "keep_checkpoints", "eval_batch_size"):
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            p.append(f"lr: must be > 0, got {self.lr}")
        for name in ("weight_decay", "vc_weight", "vc_cov_ratio", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                p.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.batch_size > 0 and self.num_workers > 0:
            if self.batch_size % self.num_workers:
                p.append(f"batch_size {self.batch_size} is not divisible by num_workers "
                         f"{self.num_workers} (the global batch is split evenly)")
            elif self.batch_size // self.num_workers < 2 and self.vc_weight > 0:
                p.append(f"batch_size {self.batch_size} over {self.num_workers} workers: VC needs "
                         "at least 2 images per worker")
        if self.precision not in PRECISIONS:
            p.append(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        elif self.precision == "fp16" and not self.use_gpu:
            p.append("precision fp16 needs use_gpu (CPU autocast supports bf16 only)")
        if not self.alpha_grid:
            p.append("alpha_grid: empty; e.g. [0.0, 0.1, ..., 1.0]")
        elif any(not 0.0 <= float(a) <= 1.0 for a in self.alpha_grid):
            p.append(f"alpha_grid: every alpha must be in [0, 1], got {list(self.alpha_grid)}")
        if self.alpha_rule not in ALPHA_RULES:
            p.append(f"alpha_rule: {self.alpha_rule!r} is not one of {', '.join(ALPHA_RULES)}")
        if self.selection_metric not in SELECTION_METRICS:
            p.append(f"selection_metric: {self.selection_metric!r} is not one of "
                     f"{', '.join(SELECTION_METRICS)} (the real test split is never used to select)")
        if self.selection_metric == "real_val" and not self.real_val:
            p.append("selection_metric real_val needs real_val (a labelled real validation set)")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.cpus_per_worker <= 0:
            p.append(f"cpus_per_worker: must be > 0, got {self.cpus_per_worker}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            p.append(f"gpus_per_worker: must be > 0 with use_gpu, got {self.gpus_per_worker}")
        return p

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "train config") -> TrainConfig:
        from regft.config import from_dict

        return from_dict(cls, data, where=where)


def resolve_train_task(cfg: TrainConfig):
    from regft.tasks import resolve_task

    return resolve_task(cfg.task, cfg.classnames, cfg.max_classes)


def _rank0_print(msg: str) -> None:
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------- data pipeline ----
class DecodeAugment:
    """Ray Data map: PNG bytes -> uint8 (B, 3, H, W) after the PIL part of a CLIP transform.

    Each row's random augmentation is drawn from its own `aug_seed` column (see train_dataset),
    so it depends on the row and the epoch, not on which task or batch the row landed in."""

    def __init__(self, pil_transform):
        self.pil_transform = pil_transform

    def __call__(self, batch: dict) -> dict:
        import io

        import numpy as np
        import torch
        from PIL import Image

        from regft.engine import to_uint8

        images = []
        for png, u in zip(batch["image"], batch["aug_seed"]):
            # torchvision's random transforms draw from torch's default CPU generator; this is a
            # Ray Data worker process, so re-seeding it per row disturbs nothing else. (Not
            # torch.manual_seed: it also seeds every accelerator backend, and per row that cut
            # the pipeline's throughput to a third.)
            torch.default_generator.manual_seed(int(float(u) * 2**53))
            with Image.open(io.BytesIO(png)) as img:
                images.append(to_uint8(self.pil_transform(img.convert("RGB"))).numpy())
        return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}


def clip_transforms(cfg: TrainConfig):
    """(train, eval) SplitTransforms of the model's CLIP preprocessing (built once, weights not
    needed: the PIL ops depend only on the architecture's image size)."""
    from regft.engine import split_clip_transform
    from regft.models import create_clip

    bundle = create_clip(cfg.model, None, seed=cfg.seed)
    return split_clip_transform(bundle.preprocess_train), split_clip_transform(bundle.preprocess_eval)


def train_dataset(cfg: TrainConfig, dataset_path: str, train_tf):
    """The train split as a Ray Dataset: shuffled every epoch, decoded and augmented (the PIL part
    of `train_tf`) on data CPUs, as uint8 (B, 3, H, W) + labels."""
    from regft.store import read_ray_dataset

    from ray.data import DataContext, RandomSeedConfig
    from ray.data.expressions import random as row_random

    # A dataset keeps the DataContext it was built under, and order-preserving execution has to
    # be in it from the start (set later, the rows still arrived in a different order on every
    # run); Train gets the same options through train_data_config. The caller's context is
    # restored.
    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        ds = read_ray_dataset(dataset_path, "train", cfg.val_fraction).select_columns(["image", "label"])
        if cfg.cache_train:
            ds = ds.materialize()  # encoded rows only: augmentation still differs every epoch
        # The pipeline re-runs once per epoch. Seeds re-drawn per execution give a fresh
        # permutation and fresh augmentations each epoch, the same ones on every run of
        # `cfg.seed`. Global, not a local buffer: the store's shards are in item_id
        # (class-major) order.
        reseeded = RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True)
        ds = ds.random_shuffle(seed=reseeded)
        ds = ds.with_column("aug_seed", row_random(seed=cfg.seed + 1, reseed_after_execution=True))
        return ds.map_batches(DecodeAugment(train_tf.pil), batch_format="numpy", batch_size=64)
    finally:
        ctx.execution_options.preserve_order = saved


def train_data_config(ds):
    """Ray Train's DataConfig for `ds`: Train replaces a dataset's execution options with the
    ones it is given (by default the process's current ones), so it is given the dataset's own,
    order-preserving ones (train_dataset) and runs the dataset as it was built. What made the
    stream reproducible in measurements was building it that way: with one worker the stream
    was the same on every run even when Train was handed the defaults instead."""
    import ray.train

    return ray.train.DataConfig(execution_options=ds.context.execution_options)


def count_split(dataset_path: str, split: str, val_fraction: float) -> int:
    from regft.store import read_table

    return read_table(dataset_path, split, val_fraction, columns=["item_id"]).num_rows


def steps_per_epoch(n_train: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: equal shards (remainder dropped), incomplete batches dropped."""
    per_worker = cfg.batch_size // cfg.num_workers
    return (n_train // cfg.num_workers) // per_worker


# ------------------------------------------------------------------ checkpoints ----
def save_checkpoint(folder: str, state_dict: dict, meta: dict, train_state: dict | None = None) -> None:
    """model.pt (a plain state dict: load with torch.load(..., weights_only=True)), meta.json and,
    for resuming, train_state.pt (optimizer/scheduler/scaler state, also weights_only-loadable)."""
    import torch

    torch.save(state_dict, os.path.join(folder, MODEL_FILE))
    if train_state is not None:
        torch.save(train_state, os.path.join(folder, STATE_FILE))
    Path(folder, META_FILE).write_text(json.dumps(meta, indent=1, default=float), encoding="utf-8")


def load_checkpoint(folder: str) -> tuple[dict, dict]:
    """(state dict, meta) of a checkpoint folder; never unpickles arbitrary objects."""
    import torch

    state = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
    meta = json.loads(Path(folder, META_FILE).read_text(encoding="utf-8"))
    return state, meta


def _sibling_checkpoint_state(checkpoint, epoch: int) -> dict | None:
    """The weights of the checkpoint of `epoch` in the same run folder (resume: best epoch)."""
    import pyarrow.fs as pafs
    import torch
    from ray.train import Checkpoint

    fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
    parent = os.path.dirname(path)
    for info in fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{META_FILE}") as f:
                meta = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            continue
        if meta.get("epoch") == epoch and not meta.get("final"):
            with Checkpoint(info.path, fs).as_directory() as d:
                return torch.load(os.path.join(d, MODEL_FILE), map_location="cpu", weights_only=True)
    return None


# ------------------------------------------------------------------ worker loop ----
def _autocast(cfg: TrainConfig, device):
    import torch

    if device.type != "cuda":
        return (torch.bfloat16 if cfg.precision == "bf16" else None), None
    if cfg.precision == "fp32":
        return None, None
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_bf16_supported())
    if bf16:
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def _maybe_fault(fault: dict | None, epoch: int, rank: int) -> None:
    """Testing hook: rank 0 fails once after `fault["after_epoch"]` (a marker file makes it once;
    Ray Train then stops the whole worker group). `fault["mode"]`: "raise" (default, an
    exception) or "exit" (the worker process dies, as on a lost node or an OOM kill). "exit"
    first waits `exit_delay_s` (default 5): Train's controller collects reports every 2 s
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and a report not yet collected when its worker dies is
    lost, so the run would resume from the checkpoint before it."""
    if fault and rank == 0 and epoch == fault["after_epoch"] and not os.path.exists(fault["marker"]):
        Path(fault["marker"]).write_text("failed once\n")
        if fault.get("mode") == "exit":
            time.sleep(float(fault.get("exit_delay_s", 5.0)))
            os._exit(1)
        raise RuntimeError(f"injected fault after epoch {epoch}")


def diverged_report(epoch: int, mean: dict, lr: float) -> dict:
    """The report that ends a run whose epoch loss is NaN/inf: `diverged: True`, no checkpoint.
    `select_metric` is 0.0 (a diverged model is worth nothing to the search; Tune's schedulers
    need the key), the loss terms are reported as they were."""
    return {"epoch": epoch, "train_loss": mean["loss"], "ce_loss": mean["ce_loss"],
            "vc_loss": mean["vc_loss"], "grad_norm": mean["grad_norm"], "lr": lr,
            "select_metric": 0.0, "diverged": True, "final": False}


def train_fn_per_worker(config: dict) -> None:
    """Ray Train worker loop. config: {"train": TrainConfig dict, "dataset_path": str,
    "steps_per_epoch": int, "fault": None | test hook}. Every rank reports every epoch; only
    rank 0 passes checkpoints. Resumes from the latest checkpoint after a failure."""
    import ray.train
    import ray.train.torch
    import torch

    from regft import engine
    from regft.distributed import all_reduce_sum, gather_features, gather_rows, rank_and_world
    from regft.ensemble import interpolate
    from regft.export import architecture_or_none
    from regft.metrics import diversity_scores
    from regft.models import build_classifier, create_clip
    from regft.realdata import Audit, Sealed, open_real_split
    from regft.store import TorchImageDataset

    cfg = TrainConfig.from_dict(config["train"], where="train_loop_config.train")
    dataset_path, n_steps = config["dataset_path"], int(config["steps_per_epoch"])
    rank, world = rank_and_world()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    audit = Audit(cfg.audit_log, rank)
    task = resolve_train_task(cfg)

    # zero-shot model (theta_0), identical on every rank: seeded init + text-built head
    bundle = create_clip(cfg.model, cfg.pretrained, seed=cfg.seed, device=device)
    classifier = build_classifier(bundle, task, device=device)
    train_tf = engine.split_clip_transform(bundle.preprocess_train)
    eval_tf = engine.split_clip_transform(bundle.preprocess_eval)
    if repr(train_tf.pil) != config["train_pil"]:  # the Data pipeline's augmentation is this model's
        _rank0_print(f"warning: the data pipeline augments with {config['train_pil']}, but "
                     f"{cfg.model}/{cfg.pretrained} preprocesses with {train_tf.pil!r}")
    image_size = bundle.image_size
    architecture = architecture_or_none(bundle)  # recorded with the final weights (regft.export)
    del bundle  # the text tower is no longer needed
    theta_0 = engine.state_dict_cpu(classifier)
    autocast_dtype, scaler = _autocast(cfg, device)

    # eval splits: each rank holds every world-th item; results are summed over ranks
    def eval_set(dataset):
        share = range(rank, len(dataset), world)
        # decoded uint8 images are cached (evaluated once per epoch / alpha) unless too big
        cache = len(share) * 3 * image_size**2 <= EVAL_CACHE_BYTES
        return engine.EvalSet(dataset, share, cfg.eval_batch_size, cache=cache)

    eval_sets = {"synthetic_val": eval_set(
        TorchImageDataset(dataset_path, "val", eval_tf.to_uint8, cfg.val_fraction))}
    if cfg.real_val:
        eval_sets["real_val"] = eval_set(open_real_split(task, cfg.real_val, "val", eval_tf.to_uint8))
    real_test = None
    if cfg.real_test or task.real_test == "shapes:real":
        real_test = Sealed(
            "real_test", lambda: open_real_split(task, cfg.real_test, "test", eval_tf.to_uint8), audit)

    def evaluate_split(module, name, keep_features=False):
        res = engine.evaluate(module, eval_sets[name].batches(device, eval_tf.mean, eval_tf.std),
                              autocast_dtype=autocast_dtype, keep_features=keep_features)
        correct, total = all_reduce_sum([res.correct, res.total], device)
        feats = None
        if keep_features and res.features is not None:
            feats = gather_rows(res.features.to(device)).cpu()
        return (correct / total if total else float("nan")), feats

    # training state
    model = ray.train.torch.prepare_model(classifier)  # DDP when world > 1
    module = model.module if hasattr(model, "module") else model
    optimizer = engine.build_optimizer(model, cfg.lr, cfg.weight_decay)
    total_steps = max(1, n_steps * cfg.epochs)
    scheduler = engine.build_scheduler(optimizer, cfg.warmup_steps, total_steps)
    start_epoch, best = 0, {"value": -math.inf, "epoch": 0}
    theta_1 = None

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # resume (Train retry or a restarted Tune trial)
        with checkpoint.as_directory() as d:
            state, meta = load_checkpoint(d)
            if meta.get("final"):  # the run had finished: repeat its final report
                ray.train.report(meta["metrics"])
                return
            ts = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
        module.load_state_dict(state)
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if scaler is not None and ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        start_epoch, best = int(meta["epoch"]), dict(ts["best"])
        theta_1 = state if best["epoch"] == start_epoch else _sibling_checkpoint_state(
            checkpoint, best["epoch"])
        if theta_1 is None:
            raise RuntimeError(f"resume: the checkpoint of best epoch {best['epoch']} is missing")
        audit.record("resume", epoch=start_epoch, best_epoch=best["epoch"])
        _rank0_print(f"resumed after epoch {start_epoch} (best so far: epoch {best['epoch']})")

    shard = ray.train.get_dataset_shard("train")
    per_worker = cfg.batch_size // world
    gather = gather_features if world > 1 else None
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        model.train()
        sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in engine.STEP_KEYS}
        n_batches, n_images, lr = 0, 0, optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        for batch in shard.iter_torch_batches(batch_size=per_worker, drop_last=True,
                                              prefetch_batches=2):
            images = engine.normalize_uint8(batch["image"], train_tf.mean, train_tf.std)
            out = engine.train_step(model, (images, batch["label"]), optimizer, scheduler,
                                    vc_weight=cfg.vc_weight, vc_cov_ratio=cfg.vc_cov_ratio,
                                    grad_clip=cfg.grad_clip, autocast_dtype=autocast_dtype,
                                    scaler=scaler, gather_fn=gather)
            for k in engine.STEP_KEYS:
                sums[k] += out[k].to(device)
            lr = float(out["lr"])
            n_batches += 1
            n_images += images.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        totals = all_reduce_sum([n_batches, n_images, elapsed] + [sums[k].item() for k in engine.STEP_KEYS],
                                device)
        g_batches, g_images, g_elapsed = totals[0], totals[1], totals[2] / world
        mean = {k: totals[3 + i] / max(g_batches, 1) for i, k in enumerate(engine.STEP_KEYS)}
        if n_batches == 0:
            raise UserError(f"epoch {epoch}: no training batch (the train split has fewer than "
                            f"batch_size={cfg.batch_size} images per step); lower batch_size")
        if not math.isfinite(mean["loss"]):
            # diverged: every rank sees the same all-reduced mean, so all ranks stop here; no
            # checkpoint of NaN weights is written, and a retry would only diverge again
            _rank0_print(f"epoch {epoch}/{cfg.epochs}: training diverged (loss {mean['loss']}) at "
                         f"lr {cfg.lr:g}; stopping this run (diverged=True)")
            ray.train.report(diverged_report(epoch, mean, lr))
            return

        syn_acc, feats = evaluate_split(module, "synthetic_val", keep_features=True)
        metrics = {
            "epoch": epoch,
            "train_loss": mean["loss"], "ce_loss": mean["ce_loss"], "vc_loss": mean["vc_loss"],
            "vc_variance": mean["vc_variance"], "vc_covariance": mean["vc_covariance"],
            "grad_norm": mean["grad_norm"], "lr": lr,
            "images_per_s": g_images / g_elapsed if g_elapsed > 0 else float("nan"),
            "synthetic_val_acc": syn_acc,
        }
        if "real_val" in eval_sets:
            metrics["real_val_acc"] = evaluate_split(module, "real_val")[0]
        metrics.update(diversity_scores(feats) if feats is not None and len(feats) > 1 else
                       {"div_magnitude": float("nan"), "div_direction": float("nan"),
                        "effective_rank": float("nan")})
        metrics["select_metric"] = metrics[f"{cfg.selection_metric}_acc"]
        # ties go to the later epoch, as in Ray's retention of equal-scored checkpoints (so the
        # best epoch's checkpoint is always kept for a resume)
        if metrics["select_metric"] >= best["value"]:
            best = {"value": metrics["select_metric"], "epoch": epoch}
            theta_1 = engine.state_dict_cpu(model)
        _rank0_print(
            f"epoch {epoch}/{cfg.epochs} [train] loss {metrics['train_loss']:.4f} (ce "
            f"{metrics['ce_loss']:.4f}, vc {metrics['vc_loss']:.4f}) lr {lr:.3g} "
            f"{metrics['images_per_s']:.1f} img/s | [synthetic_val] acc {syn_acc:.4f}"
            + (f" | [real_val] acc {metrics['real_val_acc']:.4f}" if "real_val_acc" in metrics else "")
            + f" | select ({cfg.selection_metric}) {metrics['select_metric']:.4f}")
        train_state = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else {}, "best": best,
        }
        _report(rank, metrics, engine.state_dict_cpu(model) if rank == 0 else None,
                {"epoch": epoch, "final": False, "task": task.name, "classnames": list(task.classnames),
                 "model": cfg.model, "pretrained": cfg.pretrained, "metrics": metrics},
                train_state)
        _maybe_fault(config["fault"], epoch, rank)

    # ---- weight-space ensemble: select alpha on the selection split only ----
    select = cfg.selection_metric
    alphas = [float(a) for a in cfg.alpha_grid]
    curve = engine.alpha_sweep(theta_0, theta_1, module, lambda m: evaluate_split(m, select)[0], alphas)
    n_select = int(all_reduce_sum([len(eval_sets[select])], device)[0])
    best_alpha = engine.select_alpha(curve, cfg.alpha_rule, n_val=n_select)
    audit.record("selection_final", best_epoch=best["epoch"], best_alpha=best_alpha)
    _rank0_print(f"alpha curve [{select}]: " + ", ".join(f"{a:.2f}:{v:.4f}" for a, v in curve)
                 + f" -> alpha {best_alpha:.2f} (epoch {best['epoch']}, {cfg.alpha_rule} rule on "
                 f"{select}, {n_select} images)")

    # ---- report-only numbers: now, and only now, the real test split may be opened ----
    if real_test is not None:
        real_test.unseal()
        eval_sets["real_test"] = eval_set(real_test.dataset)
    done = {(a, select): v for a, v in curve}
    final = {"epoch": cfg.epochs, "best_epoch": best["epoch"], "best_alpha": best_alpha,
             "alpha_curve": [[a, v] for a, v in curve], "selection_metric": select,
             "alpha_rule": cfg.alpha_rule, "select_metric": done[(best_alpha, select)], "final": True}
    if cfg.report_alpha_curves:  # alpha is already chosen: these curves are reported only
        for split in eval_sets:
            if split != select:
                other = engine.alpha_sweep(theta_0, theta_1, module,
                                           lambda m, s=split: evaluate_split(m, s)[0], alphas)
                done.update({(a, split): v for a, v in other})
                final[f"alpha_curve_{split}"] = [[a, v] for a, v in other]
    for prefix, alpha in (("zs", 0.0), ("ft", 1.0), ("ens", best_alpha)):
        module.load_state_dict(interpolate(theta_0, theta_1, alpha))
        for split in eval_sets:
            acc = done.get((alpha, split))
            if acc is None:
                acc = evaluate_split(module, split)[0]
                done[(alpha, split)] = acc
            final[f"{prefix}_{split}_acc"] = acc
    for split in eval_sets:
        _rank0_print(f"[{split}] zero-shot {final[f'zs_{split}_acc']:.4f} | fine-tuned "
                     f"{final[f'ft_{split}_acc']:.4f} | ensemble(alpha={best_alpha:.2f}) "
                     f"{final[f'ens_{split}_acc']:.4f}"
                     + (" (reported only, never used to select)" if split == "real_test" else ""))
    ensemble = interpolate(theta_0, theta_1, best_alpha) if rank == 0 else None
    _report(rank, final, ensemble,
            {"epoch": cfg.epochs, "final": True, "alpha": best_alpha, "task": task.name,
             "classnames": list(task.classnames), "model": cfg.model, "pretrained": cfg.pretrained,
             "architecture": architecture, "metrics": final}, None)


def _report(rank: int, metrics: dict, state_dict: dict | None, meta: dict, train_state: dict | None):
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="regft-ckpt-") as d:
        save_checkpoint(d, state_dict, meta, train_state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


# ----------------------------------------------------------------------- driver ----
def check_dataset(cfg: TrainConfig, dataset_path: str) -> list[str]:
    """Problems with the generated dataset for this config (missing, other classes)."""
    from regft.store import load_manifest

    try:
        manifest = load_manifest(dataset_path)
    except (FileNotFoundError, OSError, ValueError) as e:
        return [f"dataset {dataset_path}: {e} (generate it with python -m regft.generate)"]
    if not manifest.get("complete"):
        return [f"dataset {dataset_path}: generation has not finished; re-run the same "
                "python -m regft.generate command to complete it"]
    task = resolve_train_task(cfg)
    names = manifest.get("classnames")
    if names is None and isinstance(manifest.get("task"), dict):
        names = manifest["task"].get("classnames")
    if names and list(names) not in (list(task.classnames), list(task.gen_names)):
        return [f"dataset {dataset_path}: its {len(names)} classes are not the "
                f"{task.num_classes} classes of task {task.name!r} in label order"]
    return []


def real_split_problems(task, path: str | None, split: str) -> list[str]:
    """Open one real split's file list and labels (never pixels): a missing folder, classes
    that are not the task's, or an empty split fail here, before any work."""
    from regft.realdata import SHAPES_REAL, open_real_split

    if path is None or (split == "test" and path == SHAPES_REAL == task.real_test):
        return []  # nothing given, or the testbed's rendered split (nothing to check)
    try:
        ds = open_real_split(task, path, split)
    except ValueError as e:
        return [str(e)]
    return [f"--real-{split} {path}: no images"] if ds is not None and len(ds) == 0 else []


def check_real_data(cfg: TrainConfig) -> list[str]:
    """Both real splits of a training config (see `real_split_problems`)."""
    task = resolve_train_task(cfg)
    return real_split_problems(task, cfg.real_test, "test") + real_split_problems(task, cfg.real_val, "val")


def build_trainer(cfg: TrainConfig, dataset_path: str, run_config, *, fault: dict | None = None):
    """A TorchTrainer for one fine-tune (+ alpha sweep) of `cfg` on a generated dataset.

    `run_config`: a ray.train.RunConfig (name it from an id, no timestamps, so a restarted run or
    Tune trial resumes). Its checkpoint_config is set here (best `keep_checkpoints` by
    `select_metric`) unless the caller set one. With `run_config.failure_config.max_failures`
    > 0 a failed run resumes from its latest checkpoint. `fault` is a test hook
    ({"after_epoch": n, "marker": path}: fail once after epoch n).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    problems = cfg.validate()
    if problems:
        raise UserError(problems)
    n_train = count_split(dataset_path, "train", cfg.val_fraction)
    if count_split(dataset_path, "val", cfg.val_fraction) == 0:
        raise UserError(f"dataset {dataset_path}: no held-out synthetic_val items at val_fraction "
                        f"{cfg.val_fraction}; generate more images or raise val_fraction")
    steps = steps_per_epoch(n_train, cfg)
    if steps < 1:
        raise UserError(f"dataset {dataset_path}: {n_train} training images, fewer than one batch "
                        f"of {cfg.batch_size}; lower batch_size or generate more images")
    if run_config.checkpoint_config is None or run_config.checkpoint_config.num_to_keep is None:
        run_config.checkpoint_config = ray.train.CheckpointConfig(
            num_to_keep=cfg.keep_checkpoints, checkpoint_score_attribute="select_metric",
            checkpoint_score_order="max")
    train_tf, _ = clip_transforms(cfg)
    train = train_dataset(cfg, dataset_path, train_tf)
    resources = {"CPU": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={"train": cfg.to_dict(), "dataset_path": dataset_path,
                           "steps_per_epoch": steps, "fault": fault,
                           "train_pil": repr(train_tf.pil)},
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        datasets={"train": train},
        dataset_config=train_data_config(train),
        run_config=run_config,
    )


def run_name(cfg: TrainConfig, dataset_path: str) -> str:
    """Deterministic run name from the config and dataset (so a re-run resumes, never clashes)."""
    key = json.dumps({"cfg": cfg.to_dict(), "dataset": os.path.basename(dataset_path.rstrip("/"))},
                     sort_keys=True, default=str)
    task = cfg.task or Path(cfg.classnames or "task").stem
    return f"train-{task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass
class RunResult:
    metrics: dict
    checkpoint_path: str | None
    run_path: str


def run(cfg: TrainConfig, dataset_path: str, storage: str | None = None, name: str | None = None,
        check_cluster: bool = True, max_failures: int = 0, fault: dict | None = None) -> RunResult:
    """Validate everything, fine-tune with Ray Train, return the final metrics and checkpoint.
    Ray must be initialised (the CLI does it)."""
    import ray.train

    problems = cfg.validate()
    if not problems:
        problems += check_dataset(cfg, dataset_path) + check_real_data(cfg)
        if check_cluster:
            problems += check_resources(cfg, cluster_capacity())
    if problems:
        raise UserError(problems)
    storage = os.path.abspath(storage or "regft_runs/train") if "://" not in (storage or "") else storage
    run_config = ray.train.RunConfig(name=name or run_name(cfg, dataset_path), storage_path=storage,
                                     failure_config=ray.train.FailureConfig(max_failures=max_failures))
    result = build_trainer(cfg, dataset_path, run_config, fault=fault).fit()
    if result.error:
        raise result.error
    ckpt = result.checkpoint
    return RunResult(metrics=dict(result.metrics or {}), checkpoint_path=ckpt.path if ckpt else None,
                     run_path=result.path)


def final_table(metrics: dict) -> str:
    alpha = metrics.get("best_alpha", float("nan"))
    select = metrics.get("selection_metric", "synthetic_val")
    head = f"{'split':<15}{'zero-shot':>11}{'fine-tuned':>12}{f'ens a={alpha:.2f}':>12}"
    lines = [head, "-" * len(head)]
    for split in SPLITS:
        vals = [metrics.get(f"{p}_{split}_acc") for p in ("zs", "ft", "ens")]
        if all(v is None for v in vals):
            continue
        cells = [f"{v:.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-" for v in vals]
        note = "  <- selects epoch and alpha" if split == select else (
            "  (reported only)" if split == "real_test" else "")
        lines.append(f"{split:<15}{cells[0]:>11}{cells[1]:>12}{cells[2]:>12}{note}")
    lines.append(f"fine-tuned = best epoch ({metrics.get('best_epoch')}) by {select}; "
                 f"alpha selected on {select}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- CLI ----
def resolve_dataset(arg: str | None, cfg: TrainConfig, store: str | None) -> str:
    """--dataset: a dataset folder/URI, or a dataset id in the store; none: generate (or reuse)
    the task's dataset with regft.generate's defaults (the paper's generator)."""
    from regft import store as st
    from regft.generate import GenerationConfig, ensure_dataset

    gen = GenerationConfig(task=cfg.task, classnames_file=cfg.classnames, store=store,
                           max_classes=cfg.max_classes)
    if arg:
        if st.read_manifest(arg) is not None:
            return arg
        candidate = st.dataset_path(gen.effective_store(), arg)
        if "/" not in arg and st.read_manifest(candidate) is not None:
            return candidate
        raise UserError(f"--dataset {arg}: no dataset there (no manifest.json), nor an id in the "
                        f"store {gen.effective_store()}; create one with python -m regft.generate")
    return ensure_dataset(gen)


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m regft.train",
        description="Fine-tune CLIP on a generated dataset (CE + VC) with Ray Train, sweep the "
                    "weight-space ensemble, and report zero-shot / fine-tuned / ensemble accuracy.")
    p.add_argument("task", nargs="?", help="catalog task (e.g. cars, shapes) or a name for --classnames")
    p.add_argument("--classnames", help="text file of class names, one per line, in label order")
    p.add_argument("--max-classes", type=int, help="use only the first N classes (smoke runs)")
    p.add_argument("--dataset", help="generated dataset folder/URI, or its id in --store "
                   "(default: generate the task's dataset with regft.generate's defaults)")
    p.add_argument("--store", help="dataset store (default: $REGFT_STORE, else ./regft_data)")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--vc-weight", type=float, default=d.vc_weight)
    p.add_argument("--vc-cov-ratio", type=float, default=d.vc_cov_ratio)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--cpus-per-worker", type=float, default=d.cpus_per_worker)
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    p.add_argument("--model", default=d.model)
    p.add_argument("--pretrained", default=d.pretrained,
                   help="pretrained tag or weights file; 'none' for random init")
    p.add_argument("--real-test", help="real test split: torchvision root, ImageFolder, CSV or CoOp json")
    p.add_argument("--real-val", help="labelled real validation split (ImageFolder, CSV or CoOp json)")
    p.add_argument("--selection-metric", default=d.selection_metric, choices=SELECTION_METRICS)
    p.add_argument("--alpha-step", type=float, default=0.1, help="alpha grid 0..1 with this step")
    p.add_argument("--alpha-rule", default=d.alpha_rule, choices=ALPHA_RULES,
                   help="knee (default): where the selection curve's rise flattens; 1se: smallest "
                        "alpha within one standard error of the best; argmax: the best")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--storage", default="regft_runs/train",
                   help="local folder or URI for Ray Train runs and checkpoints")
    p.add_argument("--name", help="run name (default: derived from the config, no timestamp)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--max-failures", type=int, default=0,
                   help="restart a failed run this many times, from its latest checkpoint")
    p.add_argument("--json", dest="json_out", help="also write the final metrics to this JSON file")
    p.add_argument("--audit-log", help="record when each evaluation split is opened (JSON lines)")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from regft.ensemble import EnsembleError, alpha_grid

    try:
        grid = alpha_grid(args.alpha_step)
    except EnsembleError as e:
        raise UserError(f"--alpha-step {args.alpha_step}: {e}") from e
    pretrained = None if str(args.pretrained).lower() in ("none", "random", "") else args.pretrained
    return TrainConfig.from_dict({
        "task": args.task, "classnames": args.classnames, "max_classes": args.max_classes,
        "model": args.model, "pretrained": pretrained, "lr": args.lr,
        "weight_decay": args.weight_decay, "batch_size": args.batch_size, "epochs": args.epochs,
        "warmup_steps": args.warmup_steps, "vc_weight": args.vc_weight,
        "vc_cov_ratio": args.vc_cov_ratio, "precision": args.precision, "alpha_grid": grid,
        "alpha_rule": args.alpha_rule,
        "selection_metric": args.selection_metric, "val_fraction": args.val_fraction,
        "real_test": args.real_test, "real_val": args.real_val,
        "keep_checkpoints": args.keep_checkpoints, "num_workers": args.num_workers,
        "use_gpu": args.use_gpu, "cpus_per_worker": args.cpus_per_worker, "seed": args.seed,
        "audit_log": os.path.abspath(args.audit_log) if args.audit_log else None,
    }, where="arguments")


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.name:  # a folder under --storage
        from regft.tasks import unsafe_name_problem

        if unsafe_name_problem(args.name, "--name"):
            raise UserError(unsafe_name_problem(args.name, "--name"))
    cfg = config_from_args(args)
    from regft import raylocal

    raylocal.init(args.address)
    dataset_path = resolve_dataset(args.dataset, cfg, args.store)
    result = run(cfg, dataset_path, storage=args.storage, name=args.name,
                 max_failures=args.max_failures)
    if result.metrics.get("diverged"):
        print(f"error: training diverged at epoch {result.metrics.get('epoch')} (loss "
              f"{result.metrics.get('train_loss')}); lower --lr or raise --warmup-steps",
              file=sys.stderr)
        return 1
    print(final_table(result.metrics))
    print(f"checkpoint (ensemble weights, alpha={result.metrics.get('best_alpha')}): "
          f"{result.checkpoint_path}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.metrics, indent=1, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(_main)(argv)


if __name__ == "__main__":
    from regft.train import main as _pkg_main  # package import: same exception classes

    raise SystemExit(_pkg_main())
