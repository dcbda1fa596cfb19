"""Declarative search spaces (`regft/search_spaces/<task>.yaml`, default.yaml for a task without
its own), validated on load.

File format (every problem in a file is reported at once)::

    # python -m regft.tune cars          <- each file opens with the command that uses it
    parameters:
      lr:         {distribution: loguniform, low: 1.0e-6, high: 1.0e-3, why: "..."}
      vc_weight:  {distribution: uniform, low: 0.0, high: 0.64, why: "..."}
      vc_cov_ratio: {distribution: choice, values: [0.125], why: "..."}
    alpha: {low: 0.0, high: 1.0, step: 0.1, why: "..."}

`parameters` are sampled by Optuna (TPE), one value per trial; any training-config field
that is a number may be declared. `alpha` is *not* sampled: every trial sweeps the whole grid
on its own fine-tuned weights (no retraining) and reports the best alpha and the curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from regft.cli import UserError
from regft.ensemble import alpha_grid

DISTRIBUTIONS = {"loguniform", "uniform", "choice", "int", "logint"}
DIM_KEYS = {"distribution", "low", "high", "values", "step", "why"}
ALPHA_KEYS = {"low", "high", "step", "why"}
TOP_KEYS = {"parameters", "alpha", "task", "why"}
# dimensions that must be >= 0 (weights, ratios) or > 0 (learning rate)
NON_NEGATIVE = {"vc_weight", "vc_cov_ratio", "weight_decay", "grad_clip", "warmup_steps"}
POSITIVE = {"lr", "epochs", "batch_size"}


@dataclass(frozen=True)
class Dimension:
    name: str
    distribution: str
    low: float | None = None
    high: float | None = None
    values: tuple = ()
    step: float | None = None
    why: str = ""

    def to_tune(self):
        """The Ray Tune domain (OptunaSearch converts it to an Optuna distribution)."""
        if self.distribution == "loguniform":
            return tune.loguniform(self.low, self.high)
        if self.distribution == "uniform":
            if self.step:
                return tune.quniform(self.low, self.high, self.step)
            return tune.uniform(self.low, self.high)
        if self.distribution == "int":
            # tune.randint's upper bound is exclusive; our `high` is inclusive
            return tune.qrandint(int(self.low), int(self.high), int(self.step or 1))
        if self.distribution == "logint":
            return tune.lograndint(int(self.low), int(self.high) + 1)
        return tune.choice(list(self.values))


@dataclass(frozen=True)
class AlphaGrid:
    low: float = 0.0
    high: float = 1.0
    step: float = 0.1
    why: str = ""

    def values(self) -> list[float]:
        return alpha_grid(self.step, self.low, self.high)


@dataclass(frozen=True)
class SearchSpace:
    parameters: dict[str, Dimension]
    alpha: AlphaGrid = field(default_factory=AlphaGrid)
    source: str = ""
    text: str = ""  # the file as written, logged with the search

    def to_tune(self) -> dict[str, Any]:
        return {name: dim.to_tune() for name, dim in self.parameters.items()}


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_dimension(name: str, spec: Any, where: str, known_fields: set[str] | None) -> list[str]:
    p = f"{where}: parameters.{name}"
    if not isinstance(spec, dict):
        return [f"{p}: expected a mapping with 'distribution', got {spec!r}"]
    problems = [f"{p}: unknown key {k!r} (allowed: {', '.join(sorted(DIM_KEYS))})"
                for k in sorted(set(spec) - DIM_KEYS)]
    if known_fields is not None and name not in known_fields:
        problems.append(f"{p}: not a training setting (known: {', '.join(sorted(known_fields))})")
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        problems.append(f"{p}.distribution: {dist!r} is not one of {sorted(DISTRIBUTIONS)}")
        return problems
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            problems.append(f"{p}.values: a choice needs a non-empty list of values")
        else:
            if name in NON_NEGATIVE and any(_num(v) and v < 0 for v in values):
                problems.append(f"{p}.values: {name} must be >= 0, got {values}")
            if name in POSITIVE and any(_num(v) and v <= 0 for v in values):
                problems.append(f"{p}.values: {name} must be > 0, got {values}")
        for k in ("low", "high"):
            if k in spec:
                problems.append(f"{p}.{k}: a choice takes 'values', not low/high")
        return problems
    low, high = spec.get("low"), spec.get("high")
    for k, v in (("low", low), ("high", high)):
        if not _num(v):
            problems.append(f"{p}.{k}: expected a finite number, got {v!r}")
    if not (_num(low) and _num(high)):
        return problems
    if low >= high:
        problems.append(f"{p}: low ({low}) must be < high ({high})")
    if dist in ("loguniform", "logint") and low <= 0:
        problems.append(f"{p}: a log-scale range needs low > 0, got low={low} (use uniform to include 0)")
    if dist in ("int", "logint") and (low != int(low) or high != int(high)):
        problems.append(f"{p}: an int range needs integer bounds, got {low}..{high}")
    if name in NON_NEGATIVE and low < 0:
        problems.append(f"{p}: {name} must be >= 0, got low={low}")
    if name in POSITIVE and low <= 0:
        problems.append(f"{p}: {name} must be > 0, got low={low}")
    step = spec.get("step")
    if step is not None and (not _num(step) or step <= 0 or (_num(low) and _num(high) and step > high - low)):
        problems.append(f"{p}.step: expected 0 < step <= high - low, got {step!r}")
    return problems


def _check_alpha(spec: Any, where: str) -> list[str]:
    p = f"{where}: alpha"
    if not isinstance(spec, dict):
        return [f"{p}: expected a mapping with low/high/step, got {spec!r}"]
    problems = [f"{p}: unknown key {k!r} (allowed: {', '.join(sorted(ALPHA_KEYS))})"
                for k in sorted(set(spec) - ALPHA_KEYS)]
    low, high, step = spec.get("low", 0.0), spec.get("high", 1.0), spec.get("step", 0.1)
    for k, v in (("low", low), ("high", high), ("step", step)):
        if not _num(v):
            problems.append(f"{p}.{k}: expected a number, got {v!r}")
    if all(_num(v) for v in (low, high, step)):
        if not (0.0 <= low <= 1.0) or not (0.0 <= high <= 1.0):
            problems.append(f"{p}: alpha must lie in [0, 1], got low={low}, high={high}")
        if low > high:
            problems.append(f"{p}: low ({low}) must be <= high ({high})")
        if step <= 0:
            problems.append(f"{p}.step: must be > 0, got {step}")
    return problems


def parse_search_space(data: Any, where: str = "search space", text: str = "",
                       known_fields: set[str] | None = None) -> SearchSpace:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with 'parameters', got {type(data).__name__}")
    problems = [f"{where}: unknown top-level key {k!r} (allowed: {', '.join(sorted(TOP_KEYS))})"
                for k in sorted(set(data) - TOP_KEYS)]
    params = data.get("parameters")
    if not isinstance(params, dict) or not params:
        problems.append(f"{where}: 'parameters' must be a non-empty mapping of name -> distribution")
        params = {}
    if "alpha" in params:
        problems.append(f"{where}: parameters.alpha: alpha is swept per trial, declare it at top level as "
                        "'alpha: {low, high, step}'")
    for name, spec in params.items():
        if name != "alpha":
            problems += _check_dimension(str(name), spec, where, known_fields)
    alpha_spec = data.get("alpha", {})
    problems += _check_alpha(alpha_spec, where)
    if problems:
        raise UserError(problems)
    dims = {
        name: Dimension(
            name=name,
            distribution=spec["distribution"],
            low=spec.get("low"),
            high=spec.get("high"),
            values=tuple(spec.get("values", ())),
            step=spec.get("step"),
            why=spec.get("why", ""),
        )
        for name, spec in params.items()
    }
    return SearchSpace(parameters=dims, alpha=AlphaGrid(**alpha_spec), source=where, text=text)


def load_search_space(path: str | Path, known_fields: set[str] | None = None) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--search-space {p}: file not found")
    text = p.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" (line {line + 1})" if line is not None else ""
        raise UserError(f"{p}: malformed YAML{at}: {getattr(e, 'problem', e)}") from None
    return parse_search_space(data, where=str(p), text=text, known_fields=known_fields)


def shipped_search_space_dir() -> Path:
    """The search spaces shipped in the package (regft/search_spaces/, package data)."""
    return Path(__file__).resolve().parent / "search_spaces"


def default_search_space_path(task: str) -> Path:
    """The task's own shipped file, else default.yaml (most tasks share the default ranges)."""
    d = shipped_search_space_dir()
    shipped = {f.stem for f in d.glob("*.yaml")}  # by name: a task name is never a path
    return d / f"{task if task in shipped else 'default'}.yaml"
