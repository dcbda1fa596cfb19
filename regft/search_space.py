"""Declarative search spaces (`regft/search_spaces/<task>.yaml`, default.yaml for a task without
its own), validated on load.

File format (every problem in a file is reported at once)::

    # python -m regft.tune cars          <- each file opens with the command that uses it
    parameters:
      lr:         {distribution: loguniform, low: 1.0e-6, high: 1.0e-3, why: "..."}
      vc_weight:  {distribution: uniform, low: 0.0, high: 0.64, why: "..."}
      vc_cov_ratio: {distribution: choice, values: [0.125], why: "..."}
    alpha: {low: 0.0, high: 1.0, step: 0.1, why: "..."}

`parameters` are sampled by Optuna (TPE), one value per trial; only the settings in SEARCHABLE
may be declared, each with values of its type (an integer setting takes int/logint or a choice
of integers). The generation settings in GENERATION_DIMS (guidance, images_per_class, gen_steps,
scheduler, generator) may be declared too, as a `choice` only: each distinct combination of their
values is one dataset, generated once before the trials start (`SearchSpace.generation_requests`),
and each trial trains on the dataset of its sampled values. The file is read strictly: UTF-8,
at most MAX_SPACE_BYTES, no anchors/aliases, no key given twice. `alpha` is *not* sampled: every
trial sweeps the whole grid on its own fine-tuned weights (no retraining) and reports the best
alpha and the curve.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from regft.cli import UserError, shorten
from regft.config import read_user_text
from regft.ensemble import alpha_grid

DISTRIBUTIONS = {"loguniform", "uniform", "choice", "int", "logint"}
INT_DISTRIBUTIONS = {"int", "logint"}
DIM_KEYS = {"distribution", "low", "high", "values", "step", "why"}
ALPHA_KEYS = {"low", "high", "step", "why"}
TOP_KEYS = {"parameters", "alpha", "task", "why"}
# The training settings a search may sample, with their type (tests check these against
# regft.train.TrainConfig). Everything else is how the search runs or what it runs on, and is
# set once for all trials by a flag or a preset (NOT_SEARCHED says why, for the common ones).
SEARCHABLE = {"lr": float, "weight_decay": float, "grad_clip": float, "vc_weight": float,
              "vc_cov_ratio": float, "warmup_steps": int}
NOT_SEARCHED = {
    "epochs": "ASHA stops trials by epoch: every trial needs the same --epochs",
    "batch_size": "it must divide over the workers and fix the steps per epoch: set --batch-size",
    "model": "every trial fine-tunes the same model: set --model",
    "pretrained": "every trial starts from the same weights: set --pretrained",
    "use_gpu": "set by --gpus-per-trial",
    "num_workers": "set by --workers-per-trial",
    "alpha_grid": "declare the top-level 'alpha: {low, high, step}'",
}
# The generation settings a search may vary: search-space name -> (GenerationConfig field, type).
# Each value is one dataset, generated once for the search (and reused across searches by its
# content id), so these take a `choice` only: a continuous range has no finite set of datasets.
GENERATION_DIMS = {"guidance": ("guidance", float), "images_per_class": ("images_per_class", int),
                   "gen_steps": ("steps", int), "scheduler": ("scheduler", str),
                   "generator": ("generator", str)}
# more distinct datasets than this is a space that costs more generation than any search trains on
MAX_DATASETS = 64
# dimensions that must be >= 0 (weights, ratios) or > 0 (learning rate)
NON_NEGATIVE = {"vc_weight", "vc_cov_ratio", "weight_decay", "grad_clip", "warmup_steps"}
POSITIVE = {"lr"}
# Every alpha of the grid costs one evaluation of every split per trial; a step of 0.01 (101
# alphas) is already finer than the curve can resolve on a val split of a few hundred images.
MAX_ALPHAS = 101
# A search space is a screenful of YAML: anything far larger is the wrong file.
MAX_SPACE_BYTES = 64 * 2**10
YAML_PROBLEM_CHARS = 200  # of PyYAML's own description of a syntax error
NAME_CHARS = 40  # of a parameter's name quoted in a message


class _Refused(yaml.MarkedYAMLError):
    """Well-formed YAML that a search space may not use."""


class _StrictLoader(yaml.SafeLoader):
    """safe_load with two refusals: anchors and aliases (`&a` / `*a`: a few hundred bytes can
    expand into gigabytes) and a key given twice in one mapping (YAML would keep the last one)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise _Refused(
                None, None, "anchors and aliases (&name / *name) are not allowed; write the "
                "values out", event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _Refused(None, None, f"key {shorten(key)} given twice (lines "
                                   f"{seen[key]} and {line}); keep one", key_node.start_mark)
                seen[key] = line
            except TypeError:  # an unhashable key; the base class reports it
                continue
        return super().construct_mapping(node, deep=deep)


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

    def generation_choices(self) -> dict[str, tuple]:
        """The generation dimensions and their values (empty: every trial has one dataset)."""
        return {n: d.values for n, d in self.parameters.items() if n in GENERATION_DIMS}

    def generation_requests(self) -> list[dict[str, Any]]:
        """Every distinct combination of generation values, as {GenerationConfig field: value},
        largest images_per_class first (a smaller count is then served from it)."""
        choices = self.generation_choices()
        combos = [dict(zip(choices, values)) for values in itertools.product(*choices.values())]
        combos.sort(key=lambda c: -c.get("images_per_class", 0))
        return [generation_fields(c) for c in combos]


def generation_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Sampled generation values ({dimension: value}) as GenerationConfig fields."""
    return {GENERATION_DIMS[n][0]: v for n, v in values.items() if n in GENERATION_DIMS}


def split_config(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's sampled config as (training values, generation values {dimension: value})."""
    train = {k: v for k, v in config.items() if k not in GENERATION_DIMS}
    return train, {k: v for k, v in config.items() if k in GENERATION_DIMS}


def generation_key(fields: dict[str, Any]) -> str:
    """The key of one dataset request among a search's ({GenerationConfig field: value}; {} when
    the space has no generation dimension): what a trial looks its dataset up by."""
    return json.dumps(fields, sort_keys=True)


def _num(x) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:
        return False


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and _num(x)


def _searchable() -> str:
    return (f"{', '.join(sorted(SEARCHABLE))}; generation (a choice): "
            f"{', '.join(sorted(GENERATION_DIMS))}")


def _name_problem(name: str, p: str, known_fields: set[str] | None) -> str | None:
    if name in SEARCHABLE or name in GENERATION_DIMS:
        return None
    if name in NOT_SEARCHED:
        return f"{p}: {name} cannot be searched ({NOT_SEARCHED[name]})"
    if known_fields is not None and name in known_fields:
        return (f"{p}: {name} cannot be searched (the same for every trial: set it with a flag or "
                f"a preset); searchable: {_searchable()}")
    return f"{p}: not a training or generation setting (searchable: {_searchable()})"


def _check_choice(name: str, spec: dict, p: str) -> list[str]:
    problems = [f"{p}.{k}: a choice takes 'values', not low/high/step" for k in ("low", "high", "step")
                if k in spec]
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        return problems + [f"{p}.values: a choice needs a non-empty list of values, got {shorten(values)}"]
    kind = SEARCHABLE.get(name)
    if kind is int and not all(_is_int(v) for v in values):
        problems.append(f"{p}.values: {name} is an integer setting, got {shorten(values)}")
    elif kind is float and not all(_num(v) for v in values):
        problems.append(f"{p}.values: {name} takes finite numbers, got {shorten(values)}")
    elif name in NON_NEGATIVE and any(v < 0 for v in values):
        problems.append(f"{p}.values: {name} must be >= 0, got {shorten(values)}")
    elif name in POSITIVE and any(v <= 0 for v in values):
        problems.append(f"{p}.values: {name} must be > 0, got {shorten(values)}")
    return problems


def _check_generation_choice(name: str, spec: dict, p: str) -> list[str]:
    """A generation dimension: a choice of distinct values of its setting's type."""
    if spec.get("distribution") != "choice":
        return [f"{p}: {name} is a generation setting: each value is a dataset generated once, so "
                f"declare 'distribution: choice' with a list of values, not "
                f"{shorten(spec.get('distribution'))}"]
    problems = [f"{p}.{k}: a choice takes 'values', not low/high/step" for k in ("low", "high", "step")
                if k in spec]
    values = spec.get("values")
    if not isinstance(values, list) or not values:
        return problems + [f"{p}.values: a choice needs a non-empty list of values, got {shorten(values)}"]
    kind = GENERATION_DIMS[name][1]
    if kind is int and not all(_is_int(v) and v >= 1 for v in values):
        problems.append(f"{p}.values: {name} takes whole numbers >= 1, got {shorten(values)}")
    elif kind is float and not all(_num(v) and v >= 0 for v in values):
        problems.append(f"{p}.values: {name} takes finite numbers >= 0, got {shorten(values)}")
    elif kind is str and not all(isinstance(v, str) and v.strip() for v in values):
        problems.append(f"{p}.values: {name} takes non-empty names, got {shorten(values)}")
    elif len(set(values)) != len(values):
        problems.append(f"{p}.values: a value is listed twice in {shorten(values)}; list each once")
    return problems


def _check_range(name: str, dist: str, spec: dict, p: str) -> list[str]:
    problems = [f"{p}.values: 'values' is for a choice; a {dist} range takes low/high"] \
        if "values" in spec else []
    low, high = spec.get("low"), spec.get("high")
    for k, v in (("low", low), ("high", high)):
        if not _num(v):
            problems.append(f"{p}.{k}: expected a finite number, got {shorten(v)}")
    if not (_num(low) and _num(high)):
        return problems
    if SEARCHABLE.get(name) is int and dist not in INT_DISTRIBUTIONS:
        problems.append(f"{p}: {name} is an integer setting: use distribution int or logint, not {dist}")
    if low >= high:
        problems.append(f"{p}: low ({low}) must be < high ({high})")
    if dist in ("loguniform", "logint") and low <= 0:
        problems.append(f"{p}: a log-scale range needs low > 0, got low={low} (use uniform to include 0)")
    if dist in INT_DISTRIBUTIONS and not (_is_int(low) and _is_int(high)):
        problems.append(f"{p}: an int range needs integer bounds, got {low}..{high}")
    if name in NON_NEGATIVE and low < 0:
        problems.append(f"{p}: {name} must be >= 0, got low={low}")
    if name in POSITIVE and low <= 0:
        problems.append(f"{p}: {name} must be > 0, got low={low}")
    step = spec.get("step")
    if step is not None:
        if dist not in ("uniform", "int"):
            problems.append(f"{p}.step: only uniform and int ranges take a step, not {dist}")
        elif not _num(step) or step <= 0 or step > high - low or (dist == "int" and not _is_int(step)):
            problems.append(f"{p}.step: expected 0 < step <= high - low"
                            f"{' (an integer)' if dist == 'int' else ''}, got {shorten(step)}")
    return problems


def _check_dimension(name: str, spec: Any, where: str, known_fields: set[str] | None) -> list[str]:
    p = f"{where}: parameters.{name if len(name) <= NAME_CHARS else shorten(name, NAME_CHARS)}"
    if not isinstance(spec, dict):
        return [f"{p}: expected a mapping with 'distribution', got {shorten(spec)}"]
    problems = [f"{p}: unknown key {shorten(k)} (allowed: {', '.join(sorted(DIM_KEYS))})"
                for k in sorted(set(spec) - DIM_KEYS, key=str)]
    if not isinstance(spec.get("why", ""), str):
        problems.append(f"{p}.why: expected text, got {shorten(spec['why'])}")
    name_problem = _name_problem(str(name), p, known_fields)
    if name_problem:
        problems.append(name_problem)
    dist = spec.get("distribution")
    if not isinstance(dist, str) or dist not in DISTRIBUTIONS:
        problems.append(f"{p}.distribution: {shorten(dist)} is not one of {sorted(DISTRIBUTIONS)}")
        return problems
    if name_problem:  # its values cannot be judged against a type it does not have
        return problems
    if name in GENERATION_DIMS:
        return problems + _check_generation_choice(name, spec, p)
    if dist == "choice":
        return problems + _check_choice(name, spec, p)
    return problems + _check_range(name, dist, spec, p)


def _check_alpha(spec: Any, where: str) -> list[str]:
    p = f"{where}: alpha"
    if not isinstance(spec, dict):
        return [f"{p}: expected a mapping with low/high/step, got {shorten(spec)}"]
    problems = [f"{p}: unknown key {shorten(k)} (allowed: {', '.join(sorted(ALPHA_KEYS))})"
                for k in sorted(set(spec) - ALPHA_KEYS, key=str)]
    low, high, step = spec.get("low", 0.0), spec.get("high", 1.0), spec.get("step", 0.1)
    for k, v in (("low", low), ("high", high), ("step", step)):
        if not _num(v):
            problems.append(f"{p}.{k}: expected a finite number, got {shorten(v)}")
    if all(_num(v) for v in (low, high, step)):
        if not (0.0 <= low <= 1.0) or not (0.0 <= high <= 1.0):
            problems.append(f"{p}: alpha must lie in [0, 1], got low={low}, high={high}")
        if low > high:
            problems.append(f"{p}: low ({low}) must be <= high ({high})")
        if step <= 0:
            problems.append(f"{p}.step: must be > 0, got {step}")
        elif (high - low) / step + 1 > MAX_ALPHAS:
            problems.append(f"{p}.step: {step} gives {int((high - low) / step) + 1} alphas, more than "
                            f"{MAX_ALPHAS} (each is evaluated on every split of every trial); use "
                            f"a step >= {(high - low) / (MAX_ALPHAS - 1):.3g}")
    return problems


def parse_search_space(data: Any, where: str = "search space", text: str = "",
                       known_fields: set[str] | None = None) -> SearchSpace:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping with 'parameters', got {type(data).__name__}")
    problems = [f"{where}: unknown top-level key {shorten(k)} (allowed: {', '.join(sorted(TOP_KEYS))})"
                for k in sorted(set(data) - TOP_KEYS, key=str)]
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
    if not problems:
        problems += _dataset_count_problems(params, where)
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


def _dataset_count_problems(params: dict, where: str) -> list[str]:
    counts = [len(params[n]["values"]) for n in GENERATION_DIMS if n in params and n != "images_per_class"]
    n = math.prod(counts)
    if n <= MAX_DATASETS:
        return []
    return [f"{where}: the generation choices make {n} distinct datasets (the product of the "
            f"value counts of {', '.join(d for d in GENERATION_DIMS if d in params)}), more than "
            f"{MAX_DATASETS}; every one is generated before the trials start: list fewer values"]


def load_search_space(path: str | Path, known_fields: set[str] | None = None,
                      flag: str = "--search-space") -> SearchSpace:
    """The search space in YAML file `path` (read by config.read_user_text: at most
    MAX_SPACE_BYTES of UTF-8; parsed without anchors, aliases or repeated keys)."""
    where = f"{flag} {shorten(str(path))}"
    text = read_user_text(path, flag, MAX_SPACE_BYTES)
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = str(getattr(e, "problem", None) or e)[:YAML_PROBLEM_CHARS]
        kind = "refused YAML" if isinstance(e, _Refused) else "malformed YAML"
        raise UserError(f"{where}: {kind}{at}: {problem}") from None
    return parse_search_space(data, where=where, text=text, known_fields=known_fields)


def shipped_search_space_dir() -> Path:
    """The search spaces shipped in the package (regft/search_spaces/, package data)."""
    return Path(__file__).resolve().parent / "search_spaces"


def default_search_space_path(task: str) -> Path:
    """The task's own shipped file, else default.yaml (most tasks share the default ranges)."""
    d = shipped_search_space_dir()
    shipped = {f.stem for f in d.glob("*.yaml")}  # by name: a task name is never a path
    return d / f"{task if task in shipped else 'default'}.yaml"
