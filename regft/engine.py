"""Plain-torch training and evaluation pieces (no Ray, no file I/O).

The epoch loop built on them (`regft.loop`: train_epoch, choose_alpha, fit), the Ray Train
worker (`regft.train`) and the unit tests call these same functions:

- `build_optimizer` / `build_scheduler`: AdamW on every trainable parameter (weight decay 0.1),
  linear warm-up then cosine to 0 (the WiSE-FT schedule, docs/method.md).
- `train_step`: one step of CE + VC (VC on the embeddings of *all* ranks, via `gather_fn`),
  optional autocast + GradScaler, gradient-norm clipping.
- `evaluate`: top-1 accuracy and the embeddings of a set of batches.
- `alpha_sweep` / `select_alpha`: the weight-space ensemble curve, one interpolation per alpha.
- `split_clip_transform`, `to_uint8`, `normalize_uint8`: CLIP preprocessing split into a PIL part
  (decode, crop, augment: runs on data CPUs and yields compact uint8 tensors) and the float
  normalisation (runs where the model is). Composition equals the bundle's own transform.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from regft.ensemble import interpolate
from regft.losses import vc_loss

Batch = tuple[torch.Tensor, torch.Tensor]  # (images (B, 3, H, W) float, labels (B,) int64)


# ------------------------------------------------------------------ preprocessing ----
@dataclass(frozen=True)
class SplitTransform:
    """A CLIP transform as (PIL -> PIL ops, per-channel mean, per-channel std)."""

    pil: Callable
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_uint8(self, image) -> torch.Tensor:
        return to_uint8(self.pil(image))


def split_clip_transform(transform) -> SplitTransform:
    """Split open_clip's Compose([...PIL ops, (Maybe)ToTensor, Normalize]) in two.

    `normalize_uint8(to_uint8(pil(img)), mean, std)` equals `transform(img)` (ToTensor divides
    uint8 by 255 exactly as normalize_uint8 does).
    """
    ops = list(getattr(transform, "transforms", []))
    if (
        len(ops) < 2
        or not isinstance(ops[-1], T.Normalize)
        or "ToTensor" not in type(ops[-2]).__name__
    ):
        raise ValueError(
            f"expected a Compose ending in ToTensor + Normalize (an open_clip transform), got {transform}"
        )
    norm = ops[-1]
    return SplitTransform(
        pil=T.Compose([_own_op(op) for op in ops[:-2]]),
        mean=tuple(float(m) for m in norm.mean),
        std=tuple(float(s) for s in norm.std),
    )


class MaybeConvertMode:
    """PIL image -> image.convert(mode); arrays and tensors pass through: open_clip's
    MaybeConvertMode, re-made here with the same behaviour and repr. A train transform is pickled
    into every Ray Data process of a trial, and unpickling open_clip's op imported all of
    open_clip there (seconds per process); this one imports nothing new."""

    def __init__(self, mode: str = "RGB"):
        self.mode = mode

    def __call__(self, pic):
        return pic if isinstance(pic, (np.ndarray, torch.Tensor)) else pic.convert(self.mode)

    def __repr__(self) -> str:
        return "MaybeConvertMode()"  # open_clip's repr: transform reprs are part of shared-work keys


def _own_op(op):
    """`op`, or regft's equivalent of it when it is open_clip's MaybeConvertMode."""
    kind = type(op)
    if kind.__name__ == "MaybeConvertMode" and kind.__module__.startswith("open_clip"):
        return MaybeConvertMode(op.mode)
    return op


def to_uint8(image) -> torch.Tensor:
    """PIL image -> (3, H, W) uint8 tensor (RGB)."""
    arr = np.asarray(image.convert("RGB") if image.mode != "RGB" else image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 normalised, on the images' device."""
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - m) / s


# ------------------------------------------------------------ optimiser, schedule ----
def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW over every trainable parameter (image tower and head), as in WiSE-FT."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier at `step` (0-based): (step+1)/warmup during warm-up, then cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = total_steps - warmup_steps
    if decay <= 0:
        return 1.0
    progress = min(max(step - warmup_steps, 0) / decay, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule; call `scheduler.step()` after every optimizer step."""
    if warmup_steps < 0 or total_steps < 1:
        raise ValueError(f"need warmup_steps >= 0 and total_steps >= 1, got {warmup_steps}, {total_steps}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )


# --------------------------------------------------------------------- train step ----
STEP_KEYS = ("loss", "ce_loss", "vc_loss", "vc_variance", "vc_covariance", "grad_norm", "lr")


def train_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    scheduler=None,
    *,
    vc_weight: float,
    vc_cov_ratio: float,
    grad_clip: float = 1.0,
    autocast_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    gather_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One optimisation step of CE + VC; returns detached 0-dim tensors (no host sync).

    `model(images, return_features=True)` -> (logits, z), z = image embeddings before
    normalisation. CE is the mean over this process's rows; the VC terms are computed on
    `gather_fn(z)` (the global batch under DDP; identity by default). With vc_weight = 0 the VC
    terms are still computed (detached) for logging. `lr` is the rate used for this step.
    """
    images, labels = batch
    gather_fn = gather_fn or (lambda t: t)
    with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        logits, z = model(images, return_features=True)
    ce = F.cross_entropy(logits.float(), labels)
    if vc_weight > 0:
        terms = vc_loss(gather_fn(z.float()), vc_weight, vc_cov_ratio)
        loss = ce + terms.loss
    else:
        with torch.no_grad():
            terms = vc_loss(gather_fn(z.detach().float()), 0.0, vc_cov_ratio)
        loss = ce

    optimizer.zero_grad(set_to_none=True)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    max_norm = grad_clip if grad_clip and grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    lr = optimizer.param_groups[0]["lr"]
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return {
        "loss": loss.detach(),
        "ce_loss": ce.detach(),
        "vc_loss": terms.loss.detach(),
        "vc_variance": terms.variance.detach(),
        "vc_covariance": terms.covariance.detach(),
        "grad_norm": grad_norm.detach(),
        "lr": torch.tensor(lr),
    }


# --------------------------------------------------------------------- evaluation ----
@dataclass
class EvalResult:
    correct: int
    total: int
    features: torch.Tensor | None  # (total, d) float32 on CPU, in batch order

    @property
    def acc(self) -> float:
        return self.correct / self.total if self.total else float("nan")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    autocast_dtype: torch.dtype | None = None,
    keep_features: bool = True,
) -> EvalResult:
    """Top-1 accuracy of `model` over (images, labels) batches, plus their embeddings."""
    was_training = model.training
    model.eval()
    correct, total, feats = 0, 0, []
    try:
        for images, labels in batches:
            with torch.autocast(images.device.type, dtype=autocast_dtype or torch.float32,
                                enabled=autocast_dtype is not None):
                logits, z = model(images, return_features=True)
            correct += int((logits.argmax(dim=-1) == labels.to(logits.device)).sum().item())
            total += int(labels.shape[0])
            if keep_features:
                feats.append(z.float().cpu())
    finally:
        model.train(was_training)
    features = torch.cat(feats) if feats else None
    return EvalResult(correct, total, features)


class EvalSet:
    """Eval images of one split (or one rank's share of it) as uint8 batches, decoded once.

    `dataset[i]` -> (uint8 (3, H, W) tensor, label). Nothing is read until the first
    `batches()` call, so wrapping a split that must not be read yet (regft.realdata.Sealed)
    stays unread until then. With `cache=False` each call re-reads the dataset.
    """

    def __init__(self, dataset, indices: Sequence[int] | None = None, batch_size: int = 256,
                 cache: bool = True, num_workers: int = 0):
        self.dataset = dataset
        self.indices = list(indices) if indices is not None else None
        self.batch_size = batch_size
        self.cache = cache
        self.num_workers = num_workers
        self._cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def _read(self):
        ds = self.dataset
        if self.indices is not None:
            ds = torch.utils.data.Subset(ds, self.indices)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
        for images, labels in loader:
            yield images, labels.long()

    def batches(self, device: torch.device | str, mean, std) -> Iterable[Batch]:
        """Yield normalised float batches on `device`."""
        if self.cache and self._cached is None:
            self._cached = list(self._read()) if len(self) else []
        source = self._cached if self._cached is not None else self._read()
        for images, labels in source:
            yield normalize_uint8(images.to(device, non_blocking=True), mean, std), labels.to(device)


# ----------------------------------------------------------------- weight ensemble ----
def alpha_sweep(
    theta_0: Mapping[str, torch.Tensor],
    theta_1: Mapping[str, torch.Tensor],
    model: nn.Module,
    evaluate_fn: Callable[[nn.Module], float],
    alphas: Sequence[float],
    memo: Callable[[float, Callable[[], float]], float] | None = None,
) -> list[tuple[float, float]]:
    """[(alpha, evaluate_fn(model with theta(alpha)))]: interpolate once per alpha, no training.

    `memo(alpha, point)` may return a point's value without calling `point()` (the value of a
    point computed before: the zero-shot model's accuracy, regft.shared_work).
    `model` is left holding theta(alphas[-1]); reload the weights you need afterwards.
    """
    curve = []
    loaded = None
    for alpha in alphas:
        def point(alpha=alpha) -> float:
            nonlocal loaded
            model.load_state_dict(interpolate(theta_0, theta_1, alpha))
            loaded = alpha
            return float(evaluate_fn(model))
        curve.append((float(alpha), float(memo(float(alpha), point) if memo else point())))
    if alphas and loaded != alphas[-1]:
        model.load_state_dict(interpolate(theta_0, theta_1, alphas[-1]))
    return curve


ALPHA_RULES = ("knee", "1se", "argmax")
KNEE_MIN_LIFT = 1e-12  # a lift above the diagonal smaller than this is rounding: no knee


def select_alpha(curve: Sequence[tuple[float, float]], rule: str = "argmax",
                 n_val: int | None = None) -> float:
    """Pick alpha from (alpha, selection accuracy) pairs.

    argmax: the highest accuracy; ties go to the smallest alpha (closest to zero-shot).
    1se: the smallest alpha whose accuracy is within one binomial standard error of the best,
    sqrt(p(1-p)/n_val) on the n_val selection images (Breiman's one-standard-error rule).
    knee: the point of diminishing returns of the curve (Kneedle, Satopaa et al. 2011): with
    alpha and accuracy both rescaled to [0, 1] over the grid, the alpha where accuracy stands
    furthest above the diagonal, i.e. after which each step towards the fine-tuned model buys
    less than an even share of the total gain. Falls back to argmax when no point is above the
    diagonal (a straight or convex curve has no knee).

    Why not plain argmax: a *generated* validation split rewards the generated style, so its
    accuracy keeps rising towards alpha 1 after the part that transfers to real images has been
    learned (docs/shapes-testbed.md). 1se stops where the rise drops below the noise of n_val
    images, which near 100 % accuracy is a tiny margin, so it still lands close to alpha 1 (the
    testbed's measured picks: docs/shapes-testbed.md); the knee stops where the rise flattens,
    whatever n_val. No rule has a free parameter. NaN values (an
    empty split) are never selected unless all are NaN.
    """
    if not curve:
        raise ValueError("empty alpha curve")
    if rule not in ALPHA_RULES:
        raise ValueError(f"alpha rule {rule!r} is not one of {', '.join(ALPHA_RULES)}")
    valid = sorted((a, v) for a, v in curve if not math.isnan(v))
    if not valid:
        return float(curve[-1][0])
    best = max(v for _, v in valid)
    if rule == "knee":
        knee = _knee(valid)
        if knee is not None:
            return knee
    tol = 0.0
    if rule == "1se":
        if not n_val or n_val <= 0:
            raise ValueError("the 1se rule needs n_val, the number of selection images")
        tol = math.sqrt(best * (1.0 - best) / n_val)
    return float(min(a for a, v in valid if v >= best - tol))


def _knee(curve: list[tuple[float, float]]) -> float | None:
    """Kneedle on (alpha, accuracy) sorted by alpha; None when there is no knee."""
    (a_lo, _), (a_hi, _) = curve[0], curve[-1]
    v_lo, v_hi = min(v for _, v in curve), max(v for _, v in curve)
    if a_hi <= a_lo or v_hi <= v_lo:
        return None  # one point, or a flat curve
    # distance above the diagonal of the unit square; ties go to the smallest alpha
    lift = [((v - v_lo) / (v_hi - v_lo) - (a - a_lo) / (a_hi - a_lo), -a) for a, v in curve]
    top, neg_a = max(lift)
    return float(-neg_a) if top > KNEE_MIN_LIFT else None


def state_dict_cpu(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a model's state dict (unwraps DDP)."""
    module = model.module if hasattr(model, "module") else model
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
