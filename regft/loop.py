"""The one training loop (plain torch: no Ray, no MLflow, no files): what an epoch is, how alpha
is chosen, and a single-process `fit`.

- `precision_for(name, device)` -> `Precision`: autocast dtype + GradScaler for a precision
  setting (TrainConfig.precision) on a device.
- `train_epoch(...)` -> `EpochStats`: one pass of `engine.train_step` over a stream of batches,
  its loss terms summed on the device (no host sync per step) and all-reduced over ranks.
- `choose_alpha(...)` -> `AlphaChoice`: the weight-space ensemble's sweep on the selection split
  and `engine.select_alpha`'s pick on it.
- `fit(...)` -> `FitResult`: epochs of `train_epoch` over a torch Dataset, the best epoch's
  weights kept by the selection split, then `choose_alpha` and the reported-only curves of the
  other splits. The Ray Train worker (`regft.train.train_fn_per_worker`) runs the same steps
  across ranks; the testbed harness (`scripts/shapes_experiments.py`) and
  `benchmarks/training.py` call `fit` / `train_epoch`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from regft import engine
from regft.distributed import all_reduce_sum, rank_and_world

StateDict = dict[str, torch.Tensor]
AllReduce = Callable[[list[float], torch.device], list[float]]


# ---------------------------------------------------------------------- precision ----
@dataclass(frozen=True)
class Precision:
    """How the forward runs: autocast to `autocast_dtype` (None: fp32), with a GradScaler for fp16."""

    autocast_dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None


def precision_for(name: str, device: torch.device) -> Precision:
    """`name` is TrainConfig.precision: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU),
    fp32, bf16 or fp16 (GPU only: CPU autocast has bf16 only)."""
    if device.type != "cuda":
        return Precision(torch.bfloat16 if name == "bf16" else None, None)
    if name == "fp32":
        return Precision(None, None)
    if name == "bf16" or (name == "auto" and torch.cuda.is_bf16_supported()):
        return Precision(torch.bfloat16, None)
    return Precision(torch.float16, torch.amp.GradScaler("cuda"))


# -------------------------------------------------------------------------- epoch ----
@dataclass(frozen=True)
class EpochStats:
    """One epoch over all ranks: `mean[k]` of engine.STEP_KEYS over the global steps, the last
    step's `lr`, global batch and image counts, and the ranks' mean wall time."""

    mean: dict[str, float]
    lr: float
    batches: int
    images: int
    seconds: float

    @property
    def diverged(self) -> bool:
        return not math.isfinite(self.mean["loss"])

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def train_epoch(model: nn.Module, batches: Iterable[engine.Batch], optimizer, scheduler, *,
                vc_weight: float, vc_cov_ratio: float, grad_clip: float, precision: Precision,
                gather_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                all_reduce: AllReduce = all_reduce_sum, device: torch.device) -> EpochStats:
    """`engine.train_step` on every (normalised images, labels) batch; sums stay on `device`
    (float64) until the epoch ends, then one all-reduce (the identity in a single process)."""
    model.train()
    sums = {k: torch.zeros((), dtype=torch.float64, device=device) for k in engine.STEP_KEYS}
    n_batches, n_images, lr = 0, 0, optimizer.param_groups[0]["lr"]
    t0 = time.perf_counter()
    for images, labels in batches:
        out = engine.train_step(model, (images, labels), optimizer, scheduler,
                                vc_weight=vc_weight, vc_cov_ratio=vc_cov_ratio, grad_clip=grad_clip,
                                autocast_dtype=precision.autocast_dtype, scaler=precision.scaler,
                                gather_fn=gather_fn)
        for k in engine.STEP_KEYS:
            sums[k] += out[k].to(device)
        lr = float(out["lr"])
        n_batches += 1
        n_images += images.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the steps ran asynchronously: time them all
    elapsed = time.perf_counter() - t0
    totals = all_reduce([n_batches, n_images, elapsed] + [sums[k].item() for k in engine.STEP_KEYS],
                        device)
    world = rank_and_world()[1]
    n_global = totals[0]
    mean = {k: totals[3 + i] / max(n_global, 1) for i, k in enumerate(engine.STEP_KEYS)}
    return EpochStats(mean=mean, lr=lr, batches=int(n_global), images=int(totals[1]),
                      seconds=totals[2] / world)


# -------------------------------------------------------------------------- alpha ----
@dataclass(frozen=True)
class AlphaChoice:
    """The selection split's sweep and the alpha `rule` picked on it (`n_images` selection images)."""

    split: str
    rule: str
    n_images: int
    curve: list[tuple[float, float]]
    alpha: float

    @property
    def value(self) -> float:
        """The selection split's accuracy at the chosen alpha."""
        return dict(self.curve)[self.alpha]


def choose_alpha(theta_0: StateDict, theta_1: StateDict, model: nn.Module,
                 accuracy_fn: Callable[[nn.Module], float], alphas: Sequence[float], *, rule: str,
                 n_images: int, split: str, memo=None) -> AlphaChoice:
    """Sweep theta(alpha) on the selection split (`accuracy_fn`; `memo` as engine.alpha_sweep's)
    and pick alpha by `rule`. `model` is left holding theta(alphas[-1])."""
    curve = engine.alpha_sweep(theta_0, theta_1, model, accuracy_fn, [float(a) for a in alphas],
                               memo=memo)
    alpha = engine.select_alpha(curve, rule, n_val=n_images)
    return AlphaChoice(split=split, rule=rule, n_images=n_images, curve=curve, alpha=alpha)


# ---------------------------------------------------------------------------- fit ----
class FitSettings(Protocol):
    """What `fit` reads; a regft.train.TrainConfig is one (the one place the defaults live)."""

    lr: float
    weight_decay: float
    batch_size: int
    epochs: int
    warmup_steps: int
    grad_clip: float
    vc_weight: float
    vc_cov_ratio: float
    precision: str
    alpha_grid: list[float]
    alpha_rule: str
    selection_metric: str
    seed: int


class ArrayImages(torch.utils.data.Dataset):
    """In-memory uint8 (N, H, W, 3) images + labels as (uint8 (3, H, W), label) items, each
    passed through a PIL transform (augmentation) when read."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], pil: Callable = lambda im: im):
        self.images, self.labels, self.pil = images, [int(y) for y in labels], pil

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return engine.to_uint8(self.pil(Image.fromarray(self.images[i]))), self.labels[i]


@dataclass
class EpochLog:
    epoch: int
    stats: EpochStats
    accuracy: dict[str, float]  # the selection split's (and any other per-epoch split's)


@dataclass
class FitResult:
    theta_0: StateDict  # the zero-shot weights
    theta_1: StateDict | None  # the best epoch's weights (None: diverged before any epoch ended)
    best_epoch: int
    epochs: list[EpochLog]
    choice: AlphaChoice | None  # None when the run diverged
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # by split

    @property
    def diverged(self) -> bool:
        return bool(self.epochs) and self.epochs[-1].stats.diverged


def _train_batches(train: torch.utils.data.Dataset, batch_size: int, generator: torch.Generator,
                   mean, std, device) -> Iterator[engine.Batch]:
    """A fresh permutation per call, incomplete batches dropped (as the Ray worker's stream)."""
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True,
                                         generator=generator)
    for images, labels in loader:
        yield engine.normalize_uint8(images.to(device), mean, std), labels.long().to(device)


def split_accuracy(model: nn.Module, eval_set: engine.EvalSet, transform: engine.SplitTransform,
                   precision: Precision, device) -> float:
    batches = eval_set.batches(device, transform.mean, transform.std)
    return engine.evaluate(model, batches, autocast_dtype=precision.autocast_dtype,
                           keep_features=False).acc


def fit(model: nn.Module, train: torch.utils.data.Dataset, eval_sets: Mapping[str, engine.EvalSet],
        cfg: FitSettings, transform: engine.SplitTransform, *, device: torch.device | str = "cpu",
        report_splits: Sequence[str] = ()) -> FitResult:
    """Fine-tune `model` (an ImageClassifier at its zero-shot weights) on `train` ((uint8 image,
    label) items, augmented by the dataset) in one process; keep the best epoch by
    `eval_sets[cfg.selection_metric]` (ties to the later epoch, as the worker); choose alpha on
    that split; then sweep `report_splits` (reported only, after the choice). The shuffle and the
    augmentation (torch's default generator) are seeded from `cfg.seed`."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)  # PIL augmentations draw from torch's default generator
    shuffle = torch.Generator().manual_seed(cfg.seed)
    precision = precision_for(cfg.precision, device)
    select = cfg.selection_metric
    accuracy = lambda m, split: split_accuracy(m, eval_sets[split], transform, precision, device)  # noqa: E731
    theta_0 = engine.state_dict_cpu(model)
    optimizer = engine.build_optimizer(model, cfg.lr, cfg.weight_decay)
    steps = len(train) // cfg.batch_size
    scheduler = engine.build_scheduler(optimizer, cfg.warmup_steps, max(1, steps * cfg.epochs))
    result = FitResult(theta_0=theta_0, theta_1=None, best_epoch=0, epochs=[], choice=None)
    best = -math.inf
    for epoch in range(1, cfg.epochs + 1):
        stats = train_epoch(model, _train_batches(train, cfg.batch_size, shuffle, transform.mean,
                                                  transform.std, device),
                            optimizer, scheduler, vc_weight=cfg.vc_weight,
                            vc_cov_ratio=cfg.vc_cov_ratio, grad_clip=cfg.grad_clip,
                            precision=precision, device=device)
        result.epochs.append(EpochLog(epoch, stats, {}))
        if stats.diverged:
            return result
        value = result.epochs[-1].accuracy[select] = accuracy(model, select)
        if value >= best:
            best, result.best_epoch, result.theta_1 = value, epoch, engine.state_dict_cpu(model)
    result.choice = choose_alpha(theta_0, result.theta_1, model, lambda m: accuracy(m, select),
                                 cfg.alpha_grid, rule=cfg.alpha_rule, n_images=len(eval_sets[select]),
                                 split=select)
    result.curves[select] = result.choice.curve
    for split in report_splits:
        if split != select:
            result.curves[split] = engine.alpha_sweep(theta_0, result.theta_1, model,
                                                      lambda m, s=split: accuracy(m, s),
                                                      [float(a) for a in cfg.alpha_grid])
    return result
