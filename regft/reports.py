"""What a training run reports, typed: the wire format between the Ray Train worker, Ray Tune,
MLflow, the checkpoints and the export (pure: stdlib only).

    EpochReport     one per finished epoch (every rank reports; rank 0's reaches Tune)
    DivergedReport  the last report of a run whose epoch loss was NaN/inf (`diverged: True`)
    FinalReport     one after the last epoch: best epoch, chosen alpha, curves, zs/ft/ens numbers
    CheckpointMeta  a checkpoint's meta.json (regft.checkpoint), holding the report it was sent with

`to_dict()` gives the wire dict (flat, JSON-able: these keys are MLflow metric names, Tune's
`select_metric` and the columns of results.csv, so they never change silently); `from_dict()`
reads one back and rejects unknown and missing keys, as `regft.config.from_dict` does for user
input, so a renamed key fails where it is read instead of falling back to a default.
`parse_result(result)` reads what Tune hands back (a trial's `last_result`, a `Result.metrics`):
Tune's and Train's own bookkeeping keys (`BOOKKEEPING_KEYS`) are dropped, everything else must
belong to the report.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Union

from regft.phases import is_phase_key

# The evaluation splits, in the order the worker evaluates (and reports) them. Only the first two
# may select the epoch and alpha; the real test split is reported, never used to select.
SPLITS = ("synthetic_val", "real_val", "real_test")
SELECTION_SPLITS = ("synthetic_val", "real_val")
# report prefix -> the model it measures: theta_0 (alpha 0), theta_1 (alpha 1), the ensemble
PREFIXES = {"zs": "zero_shot", "ft": "fine_tuned", "ens": "ensemble"}
# what a diverged run reports for the score: worth nothing to the search (Tune's schedulers and
# Optuna need the key in every result)
DIVERGED_SCORE = 0.0

# Keys Ray Tune and Ray Train (2.60) add to a reported result: ray.tune.result's AUTO_RESULT_KEYS
# and DEBUG_METRICS, the result flags, and `checkpoint_path` (TuneReportCallback). The test
# tests/test_reports.py checks this list against Ray's own constants.
BOOKKEEPING_KEYS = frozenset({
    "trial_id", "experiment_id", "experiment_tag", "trainable_name", "date", "timestamp",
    "time_this_iter_s", "time_total_s", "time_since_restore",
    "training_iteration", "iterations_since_restore", "timesteps_since_restore",
    "timesteps_total", "timesteps_this_iter", "episodes_total", "episodes_this_iter",
    "pid", "hostname", "node_ip", "config", "done", "should_checkpoint",
    "checkpoint_dir_name", "checkpoint_path", "__duplicate__", "__trial_info__",
})

Curve = list[tuple[float, float]]  # [(alpha, accuracy)], in grid order


class ReportError(ValueError):
    """A report or checkpoint meta that does not have the fields this regft writes: a bug, or a
    checkpoint written by another version."""


def _fields(cls, data: dict, where: str, *, extra: frozenset = frozenset(),
            structured: tuple[str, ...] = ()) -> dict:
    """`data` restricted to `cls`'s fields (less the `structured` ones, which the caller builds
    from other wire keys); unknown keys (not in `extra`) and missing required ones are all
    reported at once."""
    if not isinstance(data, dict):
        raise ReportError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls) if f.name not in structured}
    problems = [f"unknown key {k!r}" for k in sorted(set(data) - set(known) - extra)]
    problems += [f"missing key {n!r}" for n, f in known.items() if n not in data
                 and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if problems:
        raise ReportError(f"{where}: " + "; ".join(problems))
    return {k: v for k, v in data.items() if k in known}


def _expect(data: dict, constants: dict, where: str) -> None:
    """The wire keys whose value is fixed by the report's kind (e.g. `final: True`)."""
    wrong = [f"{k}={data.get(k)!r} (expected {v!r})" for k, v in constants.items()
             if k not in data or data[k] != v]
    if wrong:
        raise ReportError(f"{where}: " + "; ".join(wrong))


def _curve(points) -> Curve:
    return [(float(a), float(v)) for a, v in points]


# --------------------------------------------------------------------------- epoch ----
@dataclass(frozen=True, kw_only=True)
class EpochReport:
    """One epoch: mean loss terms over the epoch's steps (all ranks), throughput, accuracy on the
    validation splits, the diversity of synthetic_val's embeddings, and `select_metric` (the
    selection split's accuracy: what Tune's scheduler and the checkpoint ranking read)."""

    epoch: int
    train_loss: float
    ce_loss: float
    vc_loss: float
    vc_variance: float
    vc_covariance: float
    grad_norm: float
    lr: float
    images_per_s: float
    synthetic_val_acc: float
    real_val_acc: float | None = None  # only when a real val split was given
    div_magnitude: float
    div_direction: float
    effective_rank: float
    select_metric: float

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.real_val_acc is None:
            del out["real_val_acc"]
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "epoch report") -> EpochReport:
        return cls(**_fields(cls, data, where))


# ------------------------------------------------------------------------ diverged ----
@dataclass(frozen=True, kw_only=True)
class DivergedReport:
    """The report that ends a run whose epoch loss is NaN/inf (no checkpoint is written). The loss
    terms are reported as they were; `select_metric` is DIVERGED_SCORE."""

    epoch: int
    train_loss: float
    ce_loss: float
    vc_loss: float
    grad_norm: float
    lr: float

    WIRE = {"select_metric": DIVERGED_SCORE, "diverged": True, "final": False}

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), **self.WIRE}

    @classmethod
    def from_dict(cls, data: dict, where: str = "diverged report") -> DivergedReport:
        _expect(data, cls.WIRE, where)
        return cls(**_fields(cls, data, where, extra=frozenset(cls.WIRE)))


# --------------------------------------------------------------------------- final ----
@dataclass(frozen=True)
class SplitNumbers:
    """One split's accuracy at alpha 0 (zero-shot), 1 (the best epoch) and the chosen alpha."""

    zero_shot: float
    fine_tuned: float
    ensemble: float


_ACC_KEY = re.compile(r"^(zs|ft|ens)_(.+)_acc$")
_CURVE_PREFIX = "alpha_curve_"


@dataclass(frozen=True, kw_only=True)
class FinalReport:
    """The run's result. `curves[split]`: the alpha sweep of each split (the selection split's
    chose `best_alpha`; the others are reported only); `accuracy[split]`: zs/ft/ens numbers, in
    SPLITS order. `select_metric` is the ensemble's value at `best_alpha` on the selection split.

    Wire keys: `alpha_curve` (the selection split's curve), `alpha_curve_<split>` (the others),
    `<zs|ft|ens>_<split>_acc`, `final: True`."""

    epoch: int
    best_epoch: int
    best_alpha: float
    selection_metric: str  # the split that selected the epoch and alpha
    alpha_rule: str
    select_metric: float
    curves: dict[str, Curve]
    accuracy: dict[str, SplitNumbers]

    WIRE = {"final": True}

    def acc(self, prefix: str, split: str) -> float | None:
        """The `<prefix>_<split>_acc` number (prefix zs/ft/ens); None for a split not evaluated."""
        numbers = self.accuracy.get(split)
        return None if numbers is None else getattr(numbers, PREFIXES[prefix])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "epoch": self.epoch, "best_epoch": self.best_epoch, "best_alpha": self.best_alpha,
            "alpha_curve": [[a, v] for a, v in self.curves[self.selection_metric]],
            "selection_metric": self.selection_metric, "alpha_rule": self.alpha_rule,
            "select_metric": self.select_metric, **self.WIRE,
        }
        for split, curve in self.curves.items():
            if split != self.selection_metric:
                out[f"alpha_curve_{split}"] = [[a, v] for a, v in curve]
        for prefix, name in PREFIXES.items():
            for split, numbers in self.accuracy.items():
                out[f"{prefix}_{split}_acc"] = getattr(numbers, name)
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "final report") -> FinalReport:
        _expect(data, cls.WIRE, where)
        scalars, curves, numbers = {}, {}, {}
        for key, value in data.items():
            acc = _ACC_KEY.match(key)
            if key in cls.WIRE:
                continue
            if key == "alpha_curve":
                curves[None] = _curve(value)  # the selection split's, named below
            elif key.startswith(_CURVE_PREFIX) and key[len(_CURVE_PREFIX):] in SPLITS:
                curves[key[len(_CURVE_PREFIX):]] = _curve(value)
            elif acc and acc.group(2) in SPLITS:
                numbers.setdefault(acc.group(2), {})[PREFIXES[acc.group(1)]] = value
            else:  # the scalar fields; `curves`/`accuracy` are not wire keys, so unknown here
                scalars[key] = value
        kwargs = _fields(cls, scalars, where, structured=("curves", "accuracy"))
        if None not in curves:
            raise ReportError(f"{where}: missing key 'alpha_curve'")
        curves = {kwargs["selection_metric"]: curves.pop(None), **curves}  # selection split first
        incomplete = sorted(s for s, n in numbers.items() if len(n) != len(PREFIXES))
        if incomplete:
            raise ReportError(f"{where}: split(s) {incomplete} lack one of the zs/ft/ens numbers")
        accuracy = {s: SplitNumbers(**numbers[s]) for s in SPLITS if s in numbers}
        return cls(**kwargs, curves=curves, accuracy=accuracy)


Report = Union[EpochReport, DivergedReport, FinalReport]


def report_from_dict(data: dict, where: str = "report") -> Report:
    """The typed report of a wire dict, by its kind: `final: True`, `diverged: True`, else an
    epoch report (which carries neither key)."""
    if data.get("final") is True:
        return FinalReport.from_dict(data, where)
    if data.get("diverged") is True:
        return DivergedReport.from_dict(data, where)
    return EpochReport.from_dict(data, where)


def parse_result(result: dict, where: str = "Tune result") -> Report:
    """The typed report inside a result Tune hands back (its bookkeeping keys and the worker's
    phase timings, regft.phases, dropped)."""
    return report_from_dict({k: v for k, v in result.items()
                             if k not in BOOKKEEPING_KEYS and not is_phase_key(k)}, where)


# ---------------------------------------------------------------- checkpoint meta ----
@dataclass(frozen=True, kw_only=True)
class CheckpointMeta:
    """meta.json of a checkpoint folder (regft.checkpoint). Epoch checkpoints carry their
    EpochReport; the final one (the ensemble's weights) its FinalReport, the chosen `alpha` and
    the open_clip `architecture` (regft.export; None where it could not be recorded, and in
    checkpoints written before it was)."""

    epoch: int
    final: bool
    task: str
    classnames: list[str]
    model: str
    pretrained: str | None
    metrics: Report
    alpha: float | None = None  # final only
    architecture: dict | None = None  # final only

    def __post_init__(self):
        if self.final != isinstance(self.metrics, FinalReport) or self.final != (self.alpha is not None):
            raise ReportError(f"checkpoint meta: final={self.final} with alpha={self.alpha} and a "
                              f"{type(self.metrics).__name__}")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epoch": self.epoch, "final": self.final}
        if self.final:
            out["alpha"] = self.alpha
        out.update({"task": self.task, "classnames": list(self.classnames), "model": self.model,
                    "pretrained": self.pretrained})
        if self.final:
            out["architecture"] = self.architecture
        out["metrics"] = self.metrics.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str = "meta.json") -> CheckpointMeta:
        kwargs = _fields(cls, data, where)
        kwargs["metrics"] = report_from_dict(kwargs["metrics"], f"{where}: metrics")
        return cls(**kwargs)
