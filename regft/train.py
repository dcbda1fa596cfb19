"""Fine-tune CLIP on a generated dataset with Ray Train, then weight-space-ensemble it.

    python -m regft.train shapes --dataset DATASET --epochs 2 --batch-size 64 --lr 1e-4
    python -m regft.train cars --dataset ID --real-test ~/data/stanford_cars --use-gpu --num-workers 4

One run = one fine-tune: per-epoch CE + vc_weight * VC on the worker shards of the generated
train split (Ray Data), evaluation on the held-out synthetic split (and a real val split when
given), a checkpoint per epoch (best N kept by the selection metric), then the alpha sweep of the
weight-space ensemble on the selection split. Only then is the real test split opened, and only
to report zero-shot / fine-tuned / ensemble numbers. The same worker loop serves the CLI and
every Ray Tune trial (regft.tune builds the trainer with `build_trainer`).

The worker (`train_fn_per_worker`) is a table of contents over named steps: setup_worker,
build_zero_shot, Evaluator, build_optimization, restore, then per epoch loop.train_epoch (the
shared plain-torch loop), epoch_report, send; then choose_worker_alpha (loop.choose_alpha on the
selection split), report_only_numbers and the final send. What it reports is typed in
regft.reports: an EpochReport per epoch, a DivergedReport if the loss goes NaN/inf, and one
FinalReport (`final: True`: best epoch, best alpha, the alpha curves, `zs_/ft_/ens_<split>_acc`).
"ft" is the best epoch by the selection split (the checkpoint the ensemble starts from); the
final report's `select_metric` is the ensemble's value at `best_alpha` (it is one report after
the last epoch, with the ensemble weights as its checkpoint).

Data path: the train split's PNG bytes are read once and kept in the object store
(`cache_train`), globally shuffled every epoch (the store's shards are class-major), decoded and
augmented by a Ray Data map (the PIL part of the model's `preprocess_train`) on CPUs the workers do
not hold, then split evenly over the workers (`get_dataset_shard`, equal shards, incomplete
batches dropped so every rank takes the same number of steps); normalisation runs on the worker's
device. Ray Data therefore needs CPUs of its own: `regft.resources.check_resources` asks for
`DATA_CPUS` beyond num_workers x cpus_per_worker, otherwise Train would wait forever. With
`ingest: worker` each worker reads the split and decodes its share itself (regft.ingest: the
plain loop's DataLoader, `loader_workers` processes on CPUs the worker holds; the stream is a
function of the seed and the epoch, the same at every world size and after a resume). Validation
splits are small and read by every rank (each evaluates every world-th item; counts are summed).

Checkpoints (regft.checkpoint) are plain state dicts (`model.pt`, torch.load(...,
weights_only=True)) + `meta.json` (+ `train_state.pt`: optimizer/scheduler state for resuming,
in the latest checkpoint only). The best `keep_checkpoints` are kept by `select_metric`, and the
latest besides; a restarted run (FailureConfig, or a Tune trial) resumes from the latest.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
from ray.data import DataContext, RandomSeedConfig
from ray.data.expressions import random as row_random
from ray.train.torch import TorchTrainer

from regft import checkpoint as ckpt
from regft import console, faults, raylocal, shared_work
from regft import phases as phase_stamps
from regft import store as st
from regft.augment import DecodeAugment
from regft.cli import UserError, entry_point, shorten
from regft.config import (
    empty_value_problems,
    finite_float,
    flag_names,
    from_dict,
    non_finite_fields,
    seed_problem,
)
from regft.console_ray import ray_logs_dir, train_epoch_lines
from regft.distributed import all_reduce_sum, gather_features, gather_rows, rank_and_world
from regft.engine import (
    ALPHA_RULES,
    Batch,
    EvalSet,
    SplitTransform,
    alpha_sweep,
    build_optimizer,
    build_scheduler,
    evaluate,
    normalize_uint8,
    split_clip_transform,
    state_dict_cpu,
)
from regft.ensemble import EnsembleError, alpha_grid, interpolate
from regft.errors import unwrapped_user_errors
from regft.export import architecture_or_none
from regft.generate import GenerationConfig, ensure_dataset
from regft.ingest import RankStream, available_memory_bytes, read_train_split
from regft.loop import (
    AlphaChoice,
    EpochStats,
    Precision,
    StateDict,
    choose_alpha,
    precision_for,
    train_epoch,
)
from regft.metrics import diversity_scores
from regft.models import build_classifier, create_clip, encode_texts, logit_scale_of
from regft.phases import Phases
from regft.realdata import Audit, Sealed, check_real_data, has_real_test, open_real_split
from regft.reports import (
    SELECTION_SPLITS,
    SPLITS,
    CheckpointMeta,
    DivergedReport,
    EpochReport,
    FinalReport,
    Report,
    SplitNumbers,
    parse_result,
)
from regft.resources import check_resources, cluster_capacity, worker_cpus
from regft.search_space import MAX_ALPHAS
from regft.shared_work import SharedWork
from regft.store import TorchImageDataset
from regft.tasks import Task, resolve_task, unsafe_name_problem
from regft.zeroshot import ImageClassifier, zeroshot_head

log = logging.getLogger(__name__)

SELECTION_METRICS = SELECTION_SPLITS  # the splits that may select (never real_test)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
EVAL_CACHE_BYTES = 4 * 2**30  # per rank: decoded eval images kept in memory up to this size
# Ray Data decode/augment map: rows per call (PNG decode + PIL ops; large enough to amortise
# the task overhead, small enough to keep a data CPU's batch of 224 px images ~10 MB)
DECODE_BATCH_ROWS = 64
PREFETCH_BATCHES = 2  # train batches Ray Data prepares ahead of the step that needs them
INGESTS = ("ray_data", "worker")  # TrainConfig.ingest
MAX_LOADER_WORKERS = 64
DEFAULT_BLOCK_BYTES = 128 * 2**20  # the train split's object-store blocks, when Ray sets no target
TRAIN_COLUMNS = ["image", "label"]  # what the training pipeline keeps of a stored row
MIN_VC_BATCH = 2  # VC's variance and covariance are statistics over a worker's batch


def default_alpha_grid() -> list[float]:
    return alpha_grid(0.1)


@dataclass
class TrainConfig:
    """Every training setting, with the paper's defaults (docs/method.md). The one place they
    live: the search settings hold a TrainConfig, and regft.loop.fit reads one."""

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
    # the best N epochs by select_metric, besides the latest that Train always keeps
    # (regft.checkpoint.Policy: a resume needs the latest and the best, nothing else)
    keep_checkpoints: int = 1
    # Ray Data: keep the train split's PNG bytes in the object store after the first read
    # (about the dataset's size on disk) instead of re-reading parquet every epoch (~4x slower
    # per epoch on a small set, benchmarks/RESULTS.md)
    cache_train: bool = True
    # where the train split is decoded and augmented: "ray_data" (a Ray Data map on CPUs the
    # workers do not hold, shuffled globally and split over the workers) or "worker" (each
    # worker reads the split and decodes its share in `loader_workers` DataLoader processes on
    # CPUs it holds: regft.ingest; on a small machine the plain loop's speed, benchmarks/RESULTS.md)
    ingest: str = "ray_data"
    loader_workers: int = 1  # with ingest "worker": decode processes per worker (0: in the worker)
    # resources
    num_workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # used when use_gpu
    cpus_per_worker: float = 1.0
    eval_batch_size: int = 256
    seed: int = 0
    audit_log: str | None = None  # JSON-lines record of when each split is opened (tests, audits)

    def validate(self, label: Callable[[str], str] | None = None) -> list[str]:
        """Every problem with the fields, each naming its field as `label(field)` does (default:
        the field's name; the command lines pass their flag names)."""
        n = label or str
        p = []
        if not self.task and not self.classnames:
            p.append("task: give a task name (e.g. cars) or classnames FILE")
        # one number check for every float field (NaN < 0 is False: it would pass the rest)
        p += [f"{n(f)}: must be a finite number, got {getattr(self, f)}" for f in non_finite_fields(self)]
        for name in ("batch_size", "epochs", "num_workers", "keep_checkpoints", "eval_batch_size"):
            if getattr(self, name) <= 0:
                p.append(f"{n(name)}: must be > 0, got {getattr(self, name)}")
        if self.lr <= 0:
            p.append(f"{n('lr')}: must be > 0, got {self.lr}")
        for name in ("weight_decay", "vc_weight", "vc_cov_ratio", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                p.append(f"{n(name)}: must be >= 0, got {getattr(self, name)}")
        if self.max_classes is not None and self.max_classes < 2:
            p.append(f"{n('max_classes')}: a classifier needs at least 2 classes, got {self.max_classes}")
        seed = seed_problem(self.seed, n("seed"))
        if seed:
            p.append(seed)
        p += self._batch_problems(n)
        if self.precision not in PRECISIONS:
            p.append(f"{n('precision')}: {shorten(self.precision)} is not one of {', '.join(PRECISIONS)}")
        elif self.precision == "fp16" and not self.use_gpu:
            p.append(f"{n('precision')} fp16 needs use_gpu (CPU autocast supports bf16 only)")
        if not self.alpha_grid:
            p.append(f"{n('alpha_grid')}: empty; e.g. [0.0, 0.1, ..., 1.0]")
        elif any(not 0.0 <= float(a) <= 1.0 for a in self.alpha_grid):
            p.append(f"{n('alpha_grid')}: every alpha must be in [0, 1], got "
                     f"{shorten(list(self.alpha_grid))}")
        if self.alpha_rule not in ALPHA_RULES:
            p.append(f"{n('alpha_rule')}: {shorten(self.alpha_rule)} is not one of {', '.join(ALPHA_RULES)}")
        if self.selection_metric not in SELECTION_METRICS:
            p.append(f"{n('selection_metric')}: {shorten(self.selection_metric)} is not one of "
                     f"{', '.join(SELECTION_METRICS)} (the real test split is never used to select)")
        if self.selection_metric == "real_val" and not self.real_val:
            p.append(f"{n('selection_metric')} real_val needs {n('real_val')} (a labelled real "
                     "validation set)")
        if not 0.0 < self.val_fraction < 1.0:
            p.append(f"{n('val_fraction')}: must be in (0, 1), got {self.val_fraction}")
        if self.cpus_per_worker <= 0:
            p.append(f"{n('cpus_per_worker')}: must be > 0, got {self.cpus_per_worker}")
        if self.ingest not in INGESTS:
            p.append(f"{n('ingest')}: {shorten(self.ingest)} is not one of {', '.join(INGESTS)}")
        if not 0 <= self.loader_workers <= MAX_LOADER_WORKERS:
            p.append(f"{n('loader_workers')}: must be in 0..{MAX_LOADER_WORKERS}, got "
                     f"{self.loader_workers}")
        if self.use_gpu and self.gpus_per_worker <= 0:
            p.append(f"{n('gpus_per_worker')}: must be > 0 with use_gpu, got {self.gpus_per_worker}")
        return p

    def _batch_problems(self, n: Callable[[str], str]) -> list[str]:
        """The global batch is split evenly over the workers; VC's statistics need two samples
        on each."""
        if self.batch_size <= 0 or self.num_workers <= 0:
            return []
        if self.batch_size % self.num_workers:
            return [f"{n('batch_size')} {self.batch_size} is not divisible by {n('num_workers')} "
                    f"{self.num_workers} (the global batch is split evenly)"]
        if self.batch_size // self.num_workers < MIN_VC_BATCH and self.vc_weight > 0:
            return [f"{n('batch_size')} {self.batch_size} over {self.num_workers} workers "
                    f"({n('num_workers')}): VC needs at least {MIN_VC_BATCH} images per worker"]
        return []

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "train config", validate: bool = True) -> TrainConfig:
        return from_dict(cls, data, where=where, validate=validate)


def resolve_train_task(cfg: TrainConfig) -> Task:
    return resolve_task(cfg.task, cfg.classnames, cfg.max_classes)


# ----------------------------------------------------------------- data pipeline ----
def clip_transforms(cfg: TrainConfig):
    """(train, eval) SplitTransforms of the model's CLIP preprocessing (built once, weights not
    needed: the PIL ops depend only on the architecture's image size)."""
    bundle = create_clip(cfg.model, None, seed=cfg.seed)
    return split_clip_transform(bundle.preprocess_train), split_clip_transform(bundle.preprocess_eval)


def read_ray_dataset(dataset_path: str, split: str = "train", val_fraction: float = 0.1) -> ray.data.Dataset:
    """A Ray Dataset of a complete stored dataset's rows in `split` ('train', 'val' or 'all'),
    columns as stored (regft.store.SCHEMA; image = PNG bytes). Only the shards the manifest
    lists are read."""
    fs, paths = st.split_shards(dataset_path, split, val_fraction)
    ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None)
    if split == "all":
        return ds
    return ds.map_batches(st.filter_split, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"split": split, "val_fraction": val_fraction})


def cached_train_split(dataset_path: str, val_fraction: float) -> ray.data.Dataset:
    """The train split's encoded rows (image, label) held in the object store, read here with
    pyarrow in blocks of Ray Data's target block size (a Ray Data read + materialize of the same
    rows was a smoke trial's largest fixed cost: a Ray Data job in every trial, benchmarks/RESULTS.md).

    The select + materialize is this dataset's one execution before training, as the Ray Data
    read's materialize was: the seeded shuffle (RandomSeedConfig, reseed_after_execution) counts
    its context's executions, so the epochs see the same permutations as before."""
    block_bytes = DataContext.get_current().target_max_block_size or DEFAULT_BLOCK_BYTES
    refs = [ray.put(t) for t in st.split_blocks(dataset_path, "train", val_fraction, TRAIN_COLUMNS,
                                                block_bytes)]
    return ray.data.from_arrow_refs(refs).select_columns(TRAIN_COLUMNS).materialize()


def train_dataset(cfg: TrainConfig, dataset_path: str, train_tf):
    """The train split as a Ray Dataset: shuffled every epoch, decoded and augmented (the PIL part
    of `train_tf`) on data CPUs, as uint8 (B, 3, H, W) + labels."""
    # A dataset keeps the DataContext it was built under, and order-preserving execution has to
    # be in it from the start (set later, the rows still arrived in a different order on every
    # run); Train gets the same options through train_data_config. The caller's context is
    # restored.
    ctx = DataContext.get_current()
    saved = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True
    try:
        if cfg.cache_train:
            ds = cached_train_split(dataset_path, cfg.val_fraction)
        else:
            ds = read_ray_dataset(dataset_path, "train", cfg.val_fraction).select_columns(TRAIN_COLUMNS)
        # The pipeline re-runs once per epoch. Seeds re-drawn per execution give a fresh
        # permutation and fresh augmentations each epoch, the same ones on every run of
        # `cfg.seed`. Global, not a local buffer: the store's shards are in item_id
        # (class-major) order.
        reseeded = RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True)
        ds = ds.random_shuffle(seed=reseeded)
        ds = ds.with_column("aug_seed", row_random(seed=cfg.seed + 1, reseed_after_execution=True))
        return ds.map_batches(DecodeAugment(train_tf.pil), batch_format="numpy",
                              batch_size=DECODE_BATCH_ROWS)
    finally:
        ctx.execution_options.preserve_order = saved


def train_data_config(ds):
    """Ray Train's DataConfig for `ds`: Train replaces a dataset's execution options with the
    ones it is given (by default the process's current ones), so it is given the dataset's own,
    order-preserving ones (train_dataset) and runs the dataset as it was built."""
    return ray.train.DataConfig(execution_options=ds.context.execution_options)


def count_split(dataset_path: str, split: str, val_fraction: float) -> int:
    return st.read_table(dataset_path, split, val_fraction, columns=["item_id"]).num_rows


def steps_per_epoch(n_train: int, cfg: TrainConfig) -> int:
    """Optimizer steps per epoch: equal shards (remainder dropped), incomplete batches dropped."""
    per_worker = cfg.batch_size // cfg.num_workers
    return (n_train // cfg.num_workers) // per_worker


# ------------------------------------------------------------------- worker steps ----
@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    """`train_loop_config` of the TorchTrainer (build_trainer writes it)."""

    train: dict  # TrainConfig.to_dict()
    dataset_path: str
    steps_per_epoch: int
    fault: dict | None  # regft.faults test hook
    train_pil: str  # repr of the driver's augmentation (the Data pipeline's), checked on the worker
    # wall clock (time.time()) when the trial function started and when the trainer was built:
    # the worker turns them into the phases before it runs (regft.phases); None outside a trial
    started: float | None = None
    built: float | None = None
    shared: str | None = None  # the search's shared-work folder (regft.shared_work)


@dataclass(frozen=True)
class Worker:
    """What every step of one rank needs."""

    cfg: TrainConfig
    task: Task
    rank: int
    world: int
    device: torch.device
    audit: Audit
    precision: Precision
    phases: Phases = field(default_factory=Phases)
    started: float | None = None  # wall clock of the trial function's start (WorkerConfig)
    shared: SharedWork = field(default_factory=lambda: SharedWork(None))

    def print(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)


def evaluation_threads(cfg: TrainConfig) -> int:
    """Torch threads of a CPU worker's evaluation after its last epoch: the CPUs it holds,
    rounded. With `ingest: worker` those include its decode processes' CPUs, idle once training
    has ended (the alpha and report sweeps were a smoke trial's largest cost after training)."""
    return max(1, round(worker_cpus(cfg)))


def setup_worker(wc: WorkerConfig) -> Worker:
    """The rank's Worker; its phases start with the driver's (trainer build, worker group start:
    the wall clock from the trainer being built to now)."""
    now = time.time()
    cfg = TrainConfig.from_dict(wc.train, where="train_loop_config.train")
    rank, world = rank_and_world()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    phases = Phases()
    if wc.started is not None and wc.built is not None:
        phases.add("trainer_build", wc.built - wc.started)
        phases.add("worker_group_start", now - wc.built)
    return Worker(cfg=cfg, task=resolve_train_task(cfg), rank=rank, world=world, device=device,
                  audit=Audit(cfg.audit_log, rank), precision=precision_for(cfg.precision, device),
                  phases=phases, started=wc.started, shared=SharedWork(wc.shared))


@dataclass(frozen=True)
class ZeroShot:
    """theta_0, identical on every rank (seeded init + text-built head), and its preprocessing."""

    classifier: ImageClassifier
    theta_0: StateDict
    train_tf: SplitTransform
    eval_tf: SplitTransform
    image_size: int
    architecture: dict | None  # recorded with the final weights (regft.export)
    digest: str | None = None  # theta_0's content hash when work is shared (regft.shared_work)


def build_zero_shot(w: Worker, expected_train_pil: str) -> ZeroShot:
    """CLIP and its zero-shot head (the head read from the search's shared work when there is
    one: the same text tower over the same prompts gives the same head in every trial)."""
    bundle = create_clip(w.cfg.model, w.cfg.pretrained, seed=w.cfg.seed, device=w.device)
    if w.shared.root is None:
        classifier = build_classifier(bundle, w.task, device=w.device)
    else:
        texts, scale = w.task.zeroshot_texts(), logit_scale_of(bundle.model)
        key = shared_work.head_key(bundle.model.state_dict(), texts, scale, w.device.type)
        head = w.shared.head(key, lambda: zeroshot_head(
            encode_texts(bundle.model, bundle.tokenizer, texts, device=w.device), scale))
        classifier = ImageClassifier(bundle.model, head).to(w.device)
    theta_0 = state_dict_cpu(classifier)
    train_tf = split_clip_transform(bundle.preprocess_train)
    if repr(train_tf.pil) != expected_train_pil:  # the Data pipeline's augmentation is this model's
        w.print(f"warning: the data pipeline augments with {expected_train_pil}, but "
                f"{w.cfg.model}/{w.cfg.pretrained} preprocesses with {train_tf.pil!r}")
    return ZeroShot(classifier=classifier, theta_0=theta_0, train_tf=train_tf,
                    eval_tf=split_clip_transform(bundle.preprocess_eval),
                    image_size=bundle.image_size, architecture=architecture_or_none(bundle),
                    digest=None if w.shared.root is None else shared_work.state_digest(theta_0))


class Evaluator:
    """The evaluation splits of one rank: each rank holds every world-th item, counts are summed
    over ranks. The real test split stays sealed until `open_real_test` (after selection)."""

    def __init__(self, w: Worker, dataset_path: str, zs: ZeroShot):
        self.w, self.tf, self.image_size, self.zs = w, zs.eval_tf, zs.image_size, zs
        cfg, task, to_uint8 = w.cfg, w.task, zs.eval_tf.to_uint8
        # each split's identity, for the shared work (its decoded images, theta_0's accuracy)
        self.keys = {"synthetic_val": shared_work.split_key(
            {"dataset": os.path.basename(dataset_path.rstrip("/")), "split": "val",
             "val_fraction": cfg.val_fraction}, repr(to_uint8))}
        self.sets = {"synthetic_val": self._share(self._decoded("synthetic_val", TorchImageDataset(
            dataset_path, "val", to_uint8, cfg.val_fraction)))}
        for split, path, kind in (("real_val", cfg.real_val, "val"), ("real_test", cfg.real_test, "test")):
            self.keys[split] = shared_work.split_key(
                {"real": path, "split": kind, "classnames": list(task.classnames),
                 "builtin": task.real_test if path is None else None}, repr(to_uint8))
        if cfg.real_val:
            self.sets["real_val"] = self._share(self._decoded(
                "real_val", open_real_split(task, cfg.real_val, "val", to_uint8)))
        self.real_test = None
        if has_real_test(task, cfg.real_test):
            self.real_test = Sealed("real_test", lambda: self._decoded("real_test", open_real_split(
                task, cfg.real_test, "test", to_uint8)), w.audit)

    def _decoded(self, split: str, dataset):
        return self.w.shared.decoded(self.keys[split], dataset)

    def zero_shot(self, split: str, compute: Callable[[], float]) -> float:
        """theta_0's accuracy on `split`: the search's shared value, else `compute()` (which
        evaluates theta_0 as the sweep does) and stored for the other trials."""
        if self.zs.digest is None:
            return compute()
        how = {"eval_batch_size": self.w.cfg.eval_batch_size, "world": self.w.world,
               "device": self.w.device.type, "autocast": str(self.w.precision.autocast_dtype)}
        return self.w.shared.accuracy(shared_work.accuracy_key(self.zs.digest, self.keys[split], how),
                                      compute)

    def memo(self, split: str):
        """engine.alpha_sweep's memo for `split`: alpha 0 is theta_0, shared by every trial."""
        return lambda alpha, point: self.zero_shot(split, point) if alpha == 0.0 else point()

    def _share(self, dataset) -> EvalSet:
        share = range(self.w.rank, len(dataset), self.w.world)
        # decoded uint8 images are cached (evaluated once per epoch / alpha) unless too big
        cache = len(share) * 3 * self.image_size**2 <= EVAL_CACHE_BYTES
        return EvalSet(dataset, share, self.w.cfg.eval_batch_size, cache=cache)

    @property
    def splits(self) -> list[str]:
        return list(self.sets)

    def accuracy_and_features(self, module, split: str, keep_features: bool = False):
        """(accuracy over all ranks, the embeddings of all ranks or None)."""
        device = self.w.device
        res = evaluate(module, self.sets[split].batches(device, self.tf.mean, self.tf.std),
                       autocast_dtype=self.w.precision.autocast_dtype, keep_features=keep_features)
        correct, total = all_reduce_sum([res.correct, res.total], device)
        feats = None
        if keep_features and res.features is not None:
            feats = gather_rows(res.features.to(device)).cpu()
        return (correct / total if total else float("nan")), feats

    def accuracy(self, module, split: str) -> float:
        return self.accuracy_and_features(module, split)[0]

    def size(self, split: str) -> int:
        return int(all_reduce_sum([len(self.sets[split])], self.w.device)[0])

    def open_real_test(self) -> None:
        """Now, and only now (alpha is chosen), the real test split may be read."""
        if self.real_test is not None:
            self.real_test.unseal()
            self.sets["real_test"] = self._share(self.real_test.dataset)


def build_optimization(w: Worker, zs: ZeroShot, steps_per_epoch: int):
    """(model (DDP when world > 1), its module, optimizer, per-step scheduler)."""
    model = ray.train.torch.prepare_model(zs.classifier)
    module = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(model, w.cfg.lr, w.cfg.weight_decay)
    scheduler = build_scheduler(optimizer, w.cfg.warmup_steps, max(1, steps_per_epoch * w.cfg.epochs))
    return model, module, optimizer, scheduler


@dataclass
class Progress:
    """What a checkpoint restores besides the weights: the last finished epoch and the best one
    so far (by the selection split) with its weights, theta_1."""

    start_epoch: int = 0
    best_value: float = -math.inf
    best_epoch: int = 0
    theta_1: StateDict | None = None

    def observe(self, epoch: int, value: float, model) -> None:
        # ties go to the later epoch, as in Ray's retention of equal-scored checkpoints (so the
        # best epoch's checkpoint is always kept for a resume)
        if value >= self.best_value:
            self.best_value, self.best_epoch, self.theta_1 = value, epoch, state_dict_cpu(model)

    def train_state(self, optimizer, scheduler, precision: Precision) -> dict:
        """train_state.pt of an epoch checkpoint (weights_only-loadable)."""
        scaler = precision.scaler
        return {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "best": {"value": self.best_value, "epoch": self.best_epoch}}


def restore(w: Worker, checkpoint, module, optimizer, scheduler) -> Progress | FinalReport:
    """Resume from Train's latest checkpoint (a Train retry or a restarted Tune trial): the run's
    FinalReport if it had finished, else the restored Progress (a fresh one without checkpoint)."""
    if checkpoint is None:
        return Progress()
    with checkpoint.as_directory() as d:
        state, meta = ckpt.load(d)
        if meta.final:
            return meta.metrics
        ts = ckpt.load_train_state(d)
    module.load_state_dict(state)
    optimizer.load_state_dict(ts["optimizer"])
    scheduler.load_state_dict(ts["scheduler"])
    if w.precision.scaler is not None and ts["scaler"]:
        w.precision.scaler.load_state_dict(ts["scaler"])
    best = ts["best"]
    progress = Progress(start_epoch=meta.epoch, best_value=best["value"], best_epoch=best["epoch"])
    progress.theta_1 = state if progress.best_epoch == meta.epoch else _sibling_checkpoint_state(
        checkpoint, progress.best_epoch)
    if progress.theta_1 is None:
        raise RuntimeError(f"resume: the checkpoint of best epoch {progress.best_epoch} is missing")
    w.audit.record("resume", epoch=progress.start_epoch, best_epoch=progress.best_epoch)
    w.print(f"resumed after epoch {progress.start_epoch} (best so far: epoch {progress.best_epoch})")
    return progress


def _sibling_checkpoint_state(checkpoint, epoch: int) -> StateDict | None:
    """The weights of the checkpoint of `epoch` in the same run folder (resume: best epoch)."""
    fs, run_dir = checkpoint.filesystem, os.path.dirname(checkpoint.path.rstrip("/"))
    folder = ckpt.find_epoch(fs, run_dir, epoch)
    return None if folder is None else ckpt.load_weights(fs, folder)


EpochStream = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def train_stream(w: Worker, wc: WorkerConfig, pil) -> EpochStream:
    """This rank's equal share of each epoch's train stream, as (uint8 images, labels) batches:
    from Ray Data (`ingest: ray_data`, the dataset's shard for this rank) or read and decoded
    here (`ingest: worker`, regft.ingest, with the model's own augmentation `pil`)."""
    if w.cfg.ingest == "worker":
        table = read_train_split(wc.dataset_path, w.cfg.val_fraction, TRAIN_COLUMNS,
                                 workers_on_node=ray.train.get_context().get_local_world_size(),
                                 available=available_memory_bytes())
        return RankStream(table, pil, w.cfg.seed, steps=wc.steps_per_epoch,
                          batch_per_rank=w.cfg.batch_size // w.world, rank=w.rank, world=w.world,
                          loader_workers=w.cfg.loader_workers).epoch
    shard = ray.train.get_dataset_shard("train")

    def epoch_batches(_epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # the epoch is the pipeline's: it is re-seeded per execution (train_dataset)
        for batch in shard.iter_torch_batches(batch_size=w.cfg.batch_size // w.world, drop_last=True,
                                              prefetch_batches=PREFETCH_BATCHES):
            yield batch["image"], batch["label"]
    return epoch_batches


def normalized_batches(w: Worker, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                       train_tf: SplitTransform, first_wait: list[float] | None = None) -> Iterator[Batch]:
    """One epoch of this rank's stream, normalised on the worker's device. `first_wait` gets the
    seconds until the first batch."""
    t0 = w.phases.clock()
    for images, labels in batches:
        if first_wait is not None and not first_wait:
            first_wait.append(w.phases.clock() - t0)
        yield normalize_uint8(images.to(w.device), train_tf.mean, train_tf.std), labels.to(w.device)


def train_one_epoch(w: Worker, stream: EpochStream, epoch: int, model, optimizer, scheduler,
                    train_tf: SplitTransform, first: bool = False) -> EpochStats:
    """One epoch (phase `train`); the run's `first` epoch books its wait for the first batch as
    `data_start` (the data pipeline starting)."""
    wait: list[float] = []
    with w.phases("train"):
        stats = train_epoch(model, normalized_batches(w, stream(epoch), train_tf, wait), optimizer,
                            scheduler,
                            vc_weight=w.cfg.vc_weight, vc_cov_ratio=w.cfg.vc_cov_ratio,
                            grad_clip=w.cfg.grad_clip, precision=w.precision,
                            gather_fn=gather_features if w.world > 1 else None, device=w.device)
    if first and wait:
        w.phases.move("train", "data_start", wait[0])
    return stats


def diverged_report(epoch: int, stats: EpochStats) -> DivergedReport:
    m = stats.mean
    return DivergedReport(epoch=epoch, train_loss=m["loss"], ce_loss=m["ce_loss"],
                          vc_loss=m["vc_loss"], grad_norm=m["grad_norm"], lr=stats.lr)


def epoch_report(w: Worker, epoch: int, stats: EpochStats, ev: Evaluator, module) -> EpochReport:
    """Evaluate the epoch's weights on the validation splits (synthetic_val with its embeddings,
    for the diversity scores) and report them with the epoch's training statistics."""
    syn_acc, feats = ev.accuracy_and_features(module, "synthetic_val", keep_features=True)
    real_val = ev.accuracy(module, "real_val") if "real_val" in ev.sets else None
    diversity = (diversity_scores(feats) if feats is not None and len(feats) > 1 else
                 {"div_magnitude": math.nan, "div_direction": math.nan, "effective_rank": math.nan})
    by_split = {"synthetic_val": syn_acc, "real_val": real_val}
    m = stats.mean
    return EpochReport(
        epoch=epoch, train_loss=m["loss"], ce_loss=m["ce_loss"], vc_loss=m["vc_loss"],
        vc_variance=m["vc_variance"], vc_covariance=m["vc_covariance"], grad_norm=m["grad_norm"],
        lr=stats.lr, images_per_s=stats.images_per_s, synthetic_val_acc=syn_acc,
        real_val_acc=real_val, **diversity, select_metric=by_split[w.cfg.selection_metric])


def print_epoch(w: Worker, r: EpochReport) -> None:
    w.print(f"epoch {r.epoch}/{w.cfg.epochs} [train] loss {r.train_loss:.4f} (ce {r.ce_loss:.4f}, "
            f"vc {r.vc_loss:.4f}) lr {r.lr:.3g} {r.images_per_s:.1f} img/s | [synthetic_val] acc "
            f"{r.synthetic_val_acc:.4f}"
            + (f" | [real_val] acc {r.real_val_acc:.4f}" if r.real_val_acc is not None else "")
            + f" | select ({w.cfg.selection_metric}) {r.select_metric:.4f}")


def meta_for(w: Worker, report: EpochReport | FinalReport, *, alpha: float | None = None,
             architecture: dict | None = None) -> CheckpointMeta:
    final = isinstance(report, FinalReport)
    return CheckpointMeta(epoch=report.epoch, final=final, task=w.task.name,
                          classnames=list(w.task.classnames), model=w.cfg.model,
                          pretrained=w.cfg.pretrained, metrics=report, alpha=alpha,
                          architecture=architecture)


def choose_worker_alpha(w: Worker, ev: Evaluator, zs: ZeroShot, progress: Progress, module) -> AlphaChoice:
    """Alpha on the selection split only (the real test split is still sealed)."""
    split = w.cfg.selection_metric
    choice = choose_alpha(zs.theta_0, progress.theta_1, module, lambda m: ev.accuracy(m, split),
                          w.cfg.alpha_grid, rule=w.cfg.alpha_rule, n_images=ev.size(split), split=split,
                          memo=ev.memo(split))
    w.audit.record("selection_final", best_epoch=progress.best_epoch, best_alpha=choice.alpha)
    w.print(f"alpha curve [{split}]: " + ", ".join(f"{a:.2f}:{v:.4f}" for a, v in choice.curve)
            + f" -> alpha {choice.alpha:.2f} (epoch {progress.best_epoch}, {choice.rule} rule on "
            f"{split}, {choice.n_images} images)")
    return choice


def report_only_numbers(w: Worker, ev: Evaluator, zs: ZeroShot, progress: Progress,
                        choice: AlphaChoice, module) -> FinalReport:
    """The final report: alpha is chosen, so the real test split is opened; every split's curve
    (when report_alpha_curves) and its zero-shot / fine-tuned / ensemble accuracy."""
    ev.open_real_test()
    accuracy_at = {(a, choice.split): v for a, v in choice.curve}  # (alpha, split) -> accuracy
    curves = {choice.split: choice.curve}
    alphas = [float(a) for a in w.cfg.alpha_grid]
    if w.cfg.report_alpha_curves:  # alpha is already chosen: these curves are reported only
        for split in ev.splits:
            if split != choice.split:
                curves[split] = alpha_sweep(zs.theta_0, progress.theta_1, module,
                                            lambda m, s=split: ev.accuracy(m, s), alphas,
                                            memo=ev.memo(split))
                accuracy_at.update({(a, split): v for a, v in curves[split]})
    for alpha in (0.0, 1.0, choice.alpha):  # zero-shot, fine-tuned, ensemble
        module.load_state_dict(interpolate(zs.theta_0, progress.theta_1, alpha))
        for split in ev.splits:
            if (alpha, split) not in accuracy_at:
                accuracy_at[(alpha, split)] = ev.memo(split)(alpha, lambda s=split: ev.accuracy(module, s))
    accuracy = {s: SplitNumbers(*(accuracy_at[(a, s)] for a in (0.0, 1.0, choice.alpha)))
                for s in ev.splits}
    for split, n in accuracy.items():
        w.print(f"[{split}] zero-shot {n.zero_shot:.4f} | fine-tuned {n.fine_tuned:.4f} | "
                f"ensemble(alpha={choice.alpha:.2f}) {n.ensemble:.4f}"
                + (" (reported only, never used to select)" if split == "real_test" else ""))
    return FinalReport(epoch=w.cfg.epochs, best_epoch=progress.best_epoch, best_alpha=choice.alpha,
                       selection_metric=choice.split, alpha_rule=choice.rule,
                       select_metric=choice.value, curves=curves, accuracy=accuracy)


def send(w: Worker, report: Report, state_dict: StateDict | None = None,
         meta: CheckpointMeta | None = None, train_state: dict | None = None) -> None:
    """ray.train.report on every rank; rank 0 attaches the checkpoint when one is given."""
    wire = {**report.to_dict(), **w.phases.metrics(), phase_stamps.SENT_AT: time.time()}
    if w.started is not None:
        wire[phase_stamps.TRIAL_FN_AT] = w.started
    if w.rank != 0 or meta is None:
        ray.train.report(wire)
        return
    if not meta.final:
        # the previous epoch's checkpoint was committed while this epoch trained, so this does
        # not wait; waiting for each commit right after its report was nearly all of a smoke
        # trial's checkpoint time (benchmarks/RESULTS.md, "A trial's phases")
        drop_stale_train_states()
    with tempfile.TemporaryDirectory(prefix="regft-ckpt-") as d:
        ckpt.save(d, state_dict, meta, train_state)
        ray.train.report(wire, checkpoint=ray.train.Checkpoint.from_directory(d))
    if meta.final:
        drop_stale_train_states()  # a finished run keeps no optimizer state


def drop_stale_train_states() -> None:
    """Rank 0, before an epoch checkpoint's report and after the final one: optimizer state
    stays in the latest committed checkpoint only (regft.checkpoint.Policy). Waits until Train has
    committed the last reported checkpoint (its saved state names it the latest, so a restart
    resumes from it, never from an older one), then drops train_state.pt from every older
    checkpoint Train still keeps."""
    kept = ray.train.get_all_reported_checkpoints(
        consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    latest = ray.train.get_checkpoint()
    for reported in kept:
        c = reported.checkpoint
        if latest is None or c.path != latest.path:
            ckpt.drop_train_state(c.filesystem, c.path)


# --------------------------------------------------------------------- the worker ----
def train_fn_per_worker(config: dict) -> None:
    """Ray Train worker loop (`config`: WorkerConfig as a dict). Every rank reports every epoch;
    only rank 0 passes checkpoints. Resumes from the latest checkpoint after a failure."""
    wc = from_dict(WorkerConfig, config, where="train_loop_config")
    w = setup_worker(wc)
    with w.phases("model_build"):
        zs = build_zero_shot(w, wc.train_pil)
    with w.phases("eval_setup"):
        ev = Evaluator(w, wc.dataset_path, zs)
    with w.phases("model_build"):
        model, module, optimizer, scheduler = build_optimization(w, zs, wc.steps_per_epoch)
        progress = restore(w, ray.train.get_checkpoint(), module, optimizer, scheduler)
    if isinstance(progress, FinalReport):  # the run had finished: repeat its final report
        ray.train.report(progress.to_dict())
        return
    with w.phases("data_start"):
        stream = train_stream(w, wc, zs.train_tf.pil)
    for epoch in range(progress.start_epoch + 1, w.cfg.epochs + 1):
        stats = train_one_epoch(w, stream, epoch, model, optimizer, scheduler, zs.train_tf,
                                first=epoch == progress.start_epoch + 1)
        if stats.batches == 0:
            raise UserError(f"epoch {epoch}: no training batch (the train split has fewer than "
                            f"batch_size={w.cfg.batch_size} images per step); lower batch_size")
        if stats.diverged:
            # every rank sees the same all-reduced mean, so all ranks stop here; no checkpoint of
            # NaN weights is written, and a retry would only diverge again
            w.print(f"epoch {epoch}/{w.cfg.epochs}: training diverged (loss {stats.mean['loss']}) "
                    f"at lr {w.cfg.lr:g}; stopping this run (diverged=True)")
            send(w, diverged_report(epoch, stats))
            return
        with w.phases("eval"):
            report = epoch_report(w, epoch, stats, ev, module)
        with w.phases("checkpoint"):
            progress.observe(epoch, report.select_metric, model)
            print_epoch(w, report)
            send(w, report, state_dict_cpu(model) if w.rank == 0 else None, meta_for(w, report),
                 progress.train_state(optimizer, scheduler, w.precision))
        faults.after_epoch(wc.fault, epoch, w.rank)
    if w.device.type == "cpu":
        torch.set_num_threads(evaluation_threads(w.cfg))
    with w.phases("alpha_sweep"):
        choice = choose_worker_alpha(w, ev, zs, progress, module)
    with w.phases("report_sweeps"):
        final = report_only_numbers(w, ev, zs, progress, choice, module)
    ensemble = interpolate(zs.theta_0, progress.theta_1, choice.alpha) if w.rank == 0 else None
    send(w, final, ensemble, meta_for(w, final, alpha=choice.alpha, architecture=zs.architecture))


# ----------------------------------------------------------------------- driver ----
def check_dataset(cfg: TrainConfig, dataset_path: str) -> list[str]:
    """Problems with the generated dataset for this config (missing, other classes)."""
    try:
        manifest = st.load_manifest(dataset_path)
    except (FileNotFoundError, OSError, ValueError) as e:
        return [f"dataset {dataset_path}: {e} (generate it with python -m regft.generate)"]
    if not manifest.get("complete"):
        return [f"dataset {dataset_path}: generation has not finished; re-run the same "
                "python -m regft.generate command to complete it"]
    task = resolve_train_task(cfg)
    names = manifest["task"].get("classnames") if isinstance(manifest.get("task"), dict) else None
    if names and list(names) not in (list(task.classnames), list(task.gen_names)):
        return [f"dataset {dataset_path}: its {len(names)} classes are not the "
                f"{task.num_classes} classes of task {task.name!r} in label order"]
    return []


def checkpoint_policy(cfg: TrainConfig) -> ckpt.Policy:
    """What a run of `cfg` keeps (regft.checkpoint.kept_bytes_per_trial prices it)."""
    return ckpt.Policy(keep_best=cfg.keep_checkpoints)


def build_trainer(cfg: TrainConfig, dataset_path: str, run_config, *, fault: dict | None = None,
                  started: float | None = None, shared: str | None = None):
    """A TorchTrainer for one fine-tune (+ alpha sweep) of `cfg` on a generated dataset.

    `run_config`: a ray.train.RunConfig (name it from an id, no timestamps, so a restarted run or
    Tune trial resumes). Its checkpoint_config is set here (best `keep_checkpoints` by
    `select_metric`) unless the caller set one. With `run_config.failure_config.max_failures`
    > 0 a failed run resumes from its latest checkpoint. `fault` is a test hook (regft.faults:
    {"after_epoch": n, "marker": path, "mode": "raise" | "exit"}: fail once after epoch n).
    `started`: the wall clock when the trial began (its phases, regft.phases); `shared`: the
    search's shared-work folder (regft.shared_work), None to compute everything in the trial.
    """
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
            num_to_keep=checkpoint_policy(cfg).keep_best, checkpoint_score_attribute="select_metric",
            checkpoint_score_order="max")
    train_tf, _ = clip_transforms(cfg)
    # the worker ingest's loader processes decode on CPUs the worker holds
    resources = {"CPU": worker_cpus(cfg)}
    if cfg.ingest == "worker":
        data = {}
    else:
        train = train_dataset(cfg, dataset_path, train_tf)
        data = {"datasets": {"train": train}, "dataset_config": train_data_config(train)}
    if cfg.use_gpu:
        resources["GPU"] = cfg.gpus_per_worker
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config=dataclasses.asdict(WorkerConfig(
            train=cfg.to_dict(), dataset_path=dataset_path, steps_per_epoch=steps,
            fault=None if fault is None else dataclasses.asdict(faults.Fault.from_dict(fault)),
            train_pil=repr(train_tf.pil), started=started, shared=shared,
            built=None if started is None else time.time())),
        # its process-group store on the node's loopback IP when that is one (regft.raylocal)
        torch_config=raylocal.LoopbackTorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker=resources),
        run_config=run_config,
        **data,
    )


def run_name(cfg: TrainConfig, dataset_path: str) -> str:
    """Deterministic run name from the config and dataset (so a re-run resumes, never clashes)."""
    key = json.dumps({"cfg": cfg.to_dict(), "dataset": os.path.basename(dataset_path.rstrip("/"))},
                     sort_keys=True, default=str)
    task = cfg.task or Path(cfg.classnames or "task").stem
    return f"train-{task}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


@dataclass
class RunResult:
    metrics: dict  # the last report's wire dict (what --json writes)
    checkpoint_path: str | None
    run_path: str

    @property
    def report(self) -> Report:
        return parse_result(self.metrics, where="the run's last report")


def run(cfg: TrainConfig, dataset_path: str, storage: str | None = None, name: str | None = None,
        check_cluster: bool = True, max_failures: int = 0, fault: dict | None = None,
        callbacks: list | None = None) -> RunResult:
    """Validate everything, fine-tune with Ray Train, return the final metrics and checkpoint.
    Ray must be initialised (the CLI does it). `callbacks`: ray.train.UserCallbacks (the CLI's
    epoch lines, regft.console_ray.train_epoch_lines)."""
    problems = cfg.validate()
    if not problems:
        problems += check_dataset(cfg, dataset_path) + check_real_data(cfg)
        if check_cluster:
            problems += check_resources(cfg, cluster_capacity())
    if problems:
        raise UserError(problems)
    storage = os.path.abspath(storage or "regft_runs/train") if "://" not in (storage or "") else storage
    run_config = ray.train.RunConfig(name=name or run_name(cfg, dataset_path), storage_path=storage,
                                     failure_config=ray.train.FailureConfig(max_failures=max_failures),
                                     callbacks=callbacks)
    with unwrapped_user_errors():  # a user error a worker raised is the user's: one line, exit 2
        result = build_trainer(cfg, dataset_path, run_config, fault=fault).fit()
        if result.error:
            raise result.error
    last = result.checkpoint
    return RunResult(metrics=dict(result.metrics or {}), checkpoint_path=last.path if last else None,
                     run_path=result.path)


def final_table(report: FinalReport) -> str:
    """The zero-shot / fine-tuned / ensemble accuracy of every evaluated split."""
    select, alpha = report.selection_metric, report.best_alpha
    head = f"{'split':<15}{'zero-shot':>11}{'fine-tuned':>12}{f'ens a={alpha:.2f}':>12}"
    lines = [head, "-" * len(head)]
    for split in SPLITS:
        if split not in report.accuracy:
            continue
        vals = [report.acc(p, split) for p in ("zs", "ft", "ens")]
        cells = [f"{v:.4f}" if not math.isnan(v) else "-" for v in vals]
        note = "  <- selects epoch and alpha" if split == select else (
            "  (reported only)" if split == "real_test" else "")
        lines.append(f"{split:<15}{cells[0]:>11}{cells[1]:>12}{cells[2]:>12}{note}")
    lines.append(f"fine-tuned = best epoch ({report.best_epoch}) by {select}; "
                 f"alpha selected on {select}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- CLI ----
def resolve_dataset(arg: str | None, cfg: TrainConfig, store: str | None) -> str:
    """--dataset: a dataset folder/URI, or a dataset id in the store; none: generate (or reuse)
    the task's dataset with regft.generate's defaults (the paper's generator)."""
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


USAGE = "%(prog)s [TASK] [--dataset DATASET] [--FLAG VALUE ...]   (every flag: --help)"
# TrainConfig fields set by a flag of another name (the rest: --field-name, see flag_names)
TRAIN_FLAGS = {"alpha_grid": "--alpha-step"}


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m regft.train", usage=USAGE,  # an error prints the usage: keep it one line
        description="Fine-tune CLIP on a generated dataset (CE + VC) with Ray Train, sweep the "
                    "weight-space ensemble, and report zero-shot / fine-tuned / ensemble accuracy.")
    p.add_argument("task", nargs="?", help="catalog task (e.g. cars, shapes) or a name for --classnames")
    p.add_argument("--classnames", help="text file of class names, one per line, in label order")
    p.add_argument("--max-classes", type=int, help="use only the first N classes (smoke runs)")
    p.add_argument("--dataset", help="generated dataset folder/URI, or its id in --store "
                   "(default: generate the task's dataset with regft.generate's defaults)")
    p.add_argument("--store", help="dataset store (default: $REGFT_STORE, else ./regft_data)")
    p.add_argument("--lr", type=finite_float, default=d.lr)
    p.add_argument("--vc-weight", type=finite_float, default=d.vc_weight)
    p.add_argument("--vc-cov-ratio", type=finite_float, default=d.vc_cov_ratio)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=finite_float, default=d.weight_decay)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--cpus-per-worker", type=finite_float, default=d.cpus_per_worker)
    p.add_argument("--ingest", default=d.ingest, choices=INGESTS,
                   help="where the train split is decoded: ray_data (a Ray Data map, default) or "
                        "worker (each worker's own DataLoader processes, --loader-workers)")
    p.add_argument("--loader-workers", type=int, default=d.loader_workers,
                   help="with --ingest worker: decode processes per worker (0: in the worker)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS)
    p.add_argument("--model", default=d.model)
    p.add_argument("--pretrained", default=d.pretrained,
                   help="pretrained tag or weights file; 'none' for random init")
    p.add_argument("--real-test", help="real test split: torchvision root, ImageFolder, CSV or CoOp json")
    p.add_argument("--real-val", help="labelled real validation split (ImageFolder, CSV or CoOp json)")
    p.add_argument("--selection-metric", default=d.selection_metric, choices=SELECTION_METRICS)
    p.add_argument("--alpha-step", type=finite_float, default=0.1, help="alpha grid 0..1 with this step")
    p.add_argument("--alpha-rule", default=d.alpha_rule, choices=ALPHA_RULES,
                   help="knee (default): where the selection curve's rise flattens; 1se: smallest "
                        "alpha within one standard error of the best; argmax: the best")
    p.add_argument("--val-fraction", type=finite_float, default=d.val_fraction)
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
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (workers' logs); the full log is written either way")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig the flags describe; every problem of the flags at once, each naming its
    flag (UserError)."""
    flags = {**flag_names(build_parser()), **TRAIN_FLAGS}
    problems = empty_value_problems(args, flags, allowed=("pretrained",))  # '': random init
    if args.max_failures < 0:  # Ray reads -1 as "retry forever"
        problems.append(f"--max-failures: must be >= 0, got {args.max_failures}")
    grid = default_alpha_grid()
    if args.alpha_step > 0 and 1 / args.alpha_step + 1 > MAX_ALPHAS:
        problems.append(f"--alpha-step {args.alpha_step}: more than {MAX_ALPHAS} alphas (each is "
                        f"one evaluation of every split); use a step >= {1 / (MAX_ALPHAS - 1):g}")
    else:
        try:
            grid = alpha_grid(args.alpha_step)
        except EnsembleError as e:
            problems.append(f"--alpha-step {args.alpha_step}: {e}")
    pretrained = None if str(args.pretrained).lower() in ("none", "random", "") else args.pretrained
    cfg = TrainConfig.from_dict({
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
        "ingest": args.ingest, "loader_workers": args.loader_workers,
        "audit_log": os.path.abspath(args.audit_log) if args.audit_log else None,
    }, where="arguments", validate=False)
    problems += cfg.validate(lambda f: flags.get(f, f))
    if problems:
        raise UserError(problems)
    return cfg


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.name:  # a folder under --storage
        if unsafe_name_problem(args.name, "--name"):
            raise UserError(unsafe_name_problem(args.name, "--name"))
    cfg = config_from_args(args)
    resolve_train_task(cfg)  # the class names (a --classnames file is read): before Ray starts
    storage_problem = st.check_writable(args.storage, flag="--storage")  # seconds, never a hang
    if storage_problem:
        raise UserError(storage_problem)
    real_problems = check_real_data(cfg)  # every real image decoded once: before any generation
    if real_problems:
        raise UserError(real_problems)
    with console.session(verbose=args.verbose):
        return _train_and_print(args, cfg)


def _train_and_print(args: argparse.Namespace, cfg: TrainConfig) -> int:
    raylocal.init(args.address, log_to_driver=args.verbose)
    dataset_path = resolve_dataset(args.dataset, cfg, args.store)
    # one line per epoch from the driver (the workers' own output stays in Ray's session logs)
    with contextlib.nullcontext() if args.verbose else train_epoch_lines(cfg.epochs) as lines:
        result = run(cfg, dataset_path, storage=args.storage, name=args.name,
                     max_failures=args.max_failures, callbacks=[lines] if lines else None)
    if not st.is_uri(result.run_path):
        console.log_to(Path(result.run_path) / "train.log")
    console.add_note(f"workers' output: Ray's session logs in {ray_logs_dir()}")
    report = result.report
    if isinstance(report, DivergedReport):
        print(f"error: training diverged at epoch {report.epoch} (loss {report.train_loss}); "
              "lower --lr or raise --warmup-steps", file=sys.stderr)
        return 1
    print(final_table(report))
    print(f"checkpoint (ensemble weights, alpha={report.best_alpha}): {result.checkpoint_path}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.metrics, indent=1, default=float))
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(_main)(argv)


if __name__ == "__main__":
    from regft.train import main as _pkg_main  # package import: same exception classes

    raise SystemExit(_pkg_main())
