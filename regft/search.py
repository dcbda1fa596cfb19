"""The search behind `python -m regft.tune` (orchestration ring): settings, then the named steps.

`run_search` is the table of contents: each step below is one function with typed inputs and
outputs, in the order they run.

    1. plan_search      every problem with the inputs at once, before Ray starts -> SearchPlan
    2. check_cluster    Ray; shared storage, resources and the trials' config   -> capacity
    3. layout_search    where the search lives (name, Tune, Optuna, exports)    -> SearchLayout
    4. open_parent_run  the MLflow parent run, first, so a crash leaves a record -> ParentRun
    5. prepare_dataset  the generated dataset, once; every trial reads it        -> its path
    6. build_tuner      Optuna TPE + ASHA over Ray Train trials                  -> Tuner
    7. collect_results  typed trial outcomes, orphans closed, the best trial     -> SearchOutcome
    8. deliver          summary, parent run artifacts, the exported best model
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import pyarrow.fs as pafs
import ray.train
import yaml
from mlflow.tracking import MlflowClient
from optuna.visualization import matplotlib as ovm
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import ConcurrencyLimiter

from regft import console, raylocal, store
from regft.cli import redact, shorten
from regft.config import from_dict
from regft.console_ray import TrialLines, cut, last_line, ray_logs_dir
from regft.errors import UserError, unwrapped_user_errors, user_error_in
from regft.generate import GenerationConfig, check_request, generate_dataset, request_size_problems
from regft.mlflow_store import (
    SEARCH_TAG,
    check_tracking_uri,
    close_orphan_runs,
    find_run,
    flat_params,
    get_or_create_experiment,
    numeric_metrics,
    resolve_tracking_uri,
)
from regft.models import check_weights_available
from regft.realdata import real_split_problems
from regft.registry import deliver_best
from regft.reports import SPLITS, DivergedReport, FinalReport, Report, parse_result
from regft.resources import (
    TRIAL_DRIVER_CPU,
    check_shared_storage,
    check_trial_resources,
    cluster_capacity,
    max_concurrent_trials,
)
from regft.search_space import (
    SearchSpace,
    default_search_space_path,
    generation_fields,
    generation_key,
    load_search_space,
    split_config,
)
from regft.searcher import fail_running_trials, make_searcher
from regft.tasks import SHAPES_REAL, Task, resolve_task
from regft.tracking import DatasetLineage, MLflowTrialCallback, log_datasets
from regft.train import TrainConfig, build_trainer
from regft.trial_phases import PhaseCallback

WEIGHTS_TAG = "regft.weights"  # random | pretrained, on the parent run
RANDOM_WEIGHTS = "random"
RANDOM_WEIGHTS_NOTE = ("weights: RANDOM (--weights random): real architectures, seeded random "
                       "weights; times and sizes are real, images and accuracies are noise")
SELECT = "select_metric"  # the report key Tune's scheduler and Optuna maximise
TRIAL_MAX_FAILURES = 2  # a trial's Train run restarts from its last checkpoint this often
ERROR_CHARS = 300  # a trial error quoted in the search's last line is cut here (results.csv has it all)
SECTIONS = ("train", "generation")


@dataclass
class SearchSettings:
    """Everything a search needs: the search's own options, the training config every trial
    starts from and the generation config of its dataset. Defaults are the dataclasses' (the
    paper's setting, method.md); presets and flags override them, in that order.

    `task`, `classnames`, `max_classes` and `seed` are set once here for both training and
    generation; the GPU fields and the alpha grid are derived (`trial_config`,
    `generation_config`), so a preset may not set them in its sections (`DERIVED`)."""

    task: str | None = None
    classnames: str | None = None  # a text file of class names instead of a catalog task
    max_classes: int | None = None  # use only the first N classes (smoke runs of big tasks)
    seed: int = 0  # training, generation and the sampler
    search_space: str | None = None  # default: the task's shipped file, else default.yaml
    # 16 kept on evidence (benchmarks/RESULTS.md, "Does the search pay for itself?"): on the testbed
    # more random trials helped on 1 seed of 3, were flat on 1, hurt on 1 (the selection value, not
    # the count, limited the search); ASHA ran 12 trials at 29-55 % of their full epochs
    num_samples: int = 16
    max_concurrent: int | None = None  # default: as many trials as the cluster holds at once
    scheduler: str = "asha"  # asha | fifo
    sampler: str = "tpe"  # tpe | random (regft.searcher.SAMPLERS): Optuna's proposals
    gpus_per_trial: float = 0.0  # shared evenly by the trial's workers; > 0 trains on GPU
    storage: str = "regft_runs"  # datasets, Tune/Train state and results (local path or URI)
    tracking_uri: str | None = None  # default: sqlite file in the working directory
    experiment: str | None = None  # default: regft-<task>
    name: str | None = None  # search name; default <task>-<preset>-<time>
    preset: str | None = None
    resume: bool = False
    address: str | None = None  # Ray cluster; default RAY_ADDRESS, else a local Ray
    check_only: bool = False
    verbose: bool = False  # Ray's own console output instead of regft.console's lines
    resource_check: bool = True
    # auto | pretrained: the real weights, or stop (never a silent fallback); random: the real
    # architectures with seeded random weights (regft.realsize), said on every output
    weights: str = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)


# what the search sets in each section itself (from the top-level fields, the GPUs per trial,
# the search space and the storage root): never read from a preset or a flag
DERIVED = {
    "train": {"task", "classnames", "max_classes", "seed", "use_gpu", "gpus_per_worker", "alpha_grid"},
    "generation": {"task", "classnames_file", "max_classes", "seed", "store", "use_gpu"},
}
RUN_ONLY = ("resume", "check_only")  # how this invocation runs, not what the search is


def _set(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def read_preset(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise UserError(f"{path}: malformed YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    return _in_package(data)


def _in_package(value: Any) -> Any:
    """`{package}` in a preset's strings is the installed package's folder: a shipped preset names
    files of the package (the testbed's CLIP) wherever it is installed."""
    if isinstance(value, dict):
        return {k: _in_package(v) for k, v in value.items()}
    if isinstance(value, str):
        return value.replace("{package}", str(Path(__file__).resolve().parent))
    return value


def settings_from(values: dict[str, Any], preset: Path | None = None) -> SearchSettings:
    """Settings from flag values ({path: value}, regft.tune.FLAGS) over the preset file over the
    defaults. Unknown keys, keys the search derives and wrongly typed values, of the preset and
    the flags, are all reported at once (UserError), each naming the file and the key."""
    tree = read_preset(preset) if preset else {}
    where = str(preset) if preset else "flags"
    for path, value in values.items():
        _set(tree, path, value)
    problems: list[str] = []
    sections = {}
    for name, cls in (("train", TrainConfig), ("generation", GenerationConfig)):
        data = tree.pop(name, {})
        if not isinstance(data, dict):
            problems.append(f"{where}: {name}: expected a mapping, got {data!r}")
            data = {}
        problems += [f"{where}: {name}.{k}: set by the search, not by a preset"
                     for k in sorted(set(data) & DERIVED[name])]
        sections[name] = _build(cls, data, f"{where}: {name}", problems)
    top = _build(SearchSettings, tree, where, problems)
    if problems:
        raise UserError(problems)
    return dataclasses.replace(top, **sections)


def _build(cls, data: dict, where: str, problems: list[str]):
    """`cls` from `data` with config.from_dict's key and type checks (values are checked later,
    together with everything else); problems are added to `problems`."""
    try:
        return from_dict(cls, data, where=where, validate=False)
    except UserError as e:
        problems += e.problems
        return None


def trial_config(s: SearchSettings, alpha_grid: list[float]) -> TrainConfig:
    """What every trial trains with before its sampled values are applied."""
    gpus = s.gpus_per_trial
    return dataclasses.replace(
        s.train, pretrained=None if s.weights == RANDOM_WEIGHTS else s.train.pretrained,
        task=s.task, classnames=s.classnames, max_classes=s.max_classes, seed=s.seed,
        use_gpu=gpus > 0, gpus_per_worker=gpus / s.train.num_workers if gpus > 0 else 0.0,
        alpha_grid=list(alpha_grid),
        audit_log=str(Path(s.train.audit_log).resolve()) if s.train.audit_log else None)


def weights_label(s: SearchSettings) -> str:
    """What the search's outputs say about its starting weights."""
    return RANDOM_WEIGHTS if s.weights == RANDOM_WEIGHTS else "pretrained"


def generation_config(s: SearchSettings) -> GenerationConfig:
    """The dataset's request: stored under the search's storage root, on GPUs when trials are."""
    options = s.generation.generator_options
    if s.weights == RANDOM_WEIGHTS:
        options = {**options, "weights": RANDOM_WEIGHTS}
    return dataclasses.replace(
        s.generation, task=s.task, classnames_file=s.classnames, max_classes=s.max_classes,
        seed=s.seed, store=store.join(store.absolute(s.storage), "datasets"),
        use_gpu=s.gpus_per_trial > 0, generator_options=options)


# -------------------------------------------------------------------- 1. the plan --

@dataclass(frozen=True)
class SearchPlan:
    """Validated inputs; nothing started yet."""

    settings: SearchSettings
    task: Task
    space: SearchSpace
    space_path: str
    tracking_uri: str
    generation: GenerationConfig
    trial: TrainConfig  # what every trial starts from (its sampled values override)
    # every dataset the search space can ask for: generation key -> its request, largest
    # images_per_class first (one entry, key "{}", when the space varies no generation setting)
    requests: dict[str, GenerationConfig] = field(default_factory=dict)


def search_params(plan: SearchPlan) -> dict[str, Any]:
    """The parent run's MLflow parameters: the search's own options, then the trials' training
    config and the generation request as they run (`train.<field>`, `generation.<field>`)."""
    s = plan.settings
    params = {k: v for k, v in dataclasses.asdict(s).items() if k not in (*SECTIONS, *RUN_ONLY)}
    for name, cfg in (("train", plan.trial), ("generation", plan.generation)):
        params.update({f"{name}.{k}": v for k, v in dataclasses.asdict(cfg).items()})
    return {**params, "search_space_file": plan.space_path, "num_classes": plan.task.num_classes}


def plan_search(s: SearchSettings, flag_problems: list[str] = ()) -> SearchPlan:
    """Step 1: flags, task, search space, tracking store, storage, weights, real splits and the
    generation request, all checked before any expensive work; UserError with every problem."""
    problems = list(flag_problems)
    # a submitted job's working dir is Ray's temporary copy: outputs go elsewhere (issue 19.14)
    storage, tracking, job_problems = raylocal.job_outputs(s.storage, s.tracking_uri)
    s, problems = dataclasses.replace(s, storage=storage, tracking_uri=tracking), problems + job_problems
    task = space = None
    try:
        task = resolve_task(s.task, s.classnames, s.max_classes)
    except ValueError as e:
        problems.append(str(e))
    space_path = s.search_space or str(default_search_space_path(s.task or "default"))
    try:
        space = load_search_space(space_path, known_fields={f.name for f in dataclasses.fields(TrainConfig)})
    except UserError as e:
        problems += e.problems
    tracking_uri = resolve_tracking_uri(s.tracking_uri)
    problems += check_tracking_uri(tracking_uri)
    problems += [p for p in [store.check_writable(s.storage, flag="--storage")] if p]
    try:
        check_weights_available(s.train.model, trial_config(s, []).pretrained)
    except Exception as e:  # unknown model, weights offline: one line each
        problems.append(f"--model {s.train.model} --pretrained {s.train.pretrained}: {e}")
    problems += _real_split_problems(s.train, task)
    generation = generation_config(s)
    requests, request_problems = dataset_requests(generation, space)
    problems += request_problems
    if task is not None and not flag_problems and not request_problems:  # else they restate those
        problems += list(dict.fromkeys(
            (f"search space {k}: {p}" if k != generation_key({}) else p)
            for k, r in requests.items() for p in _generation_problems(r)))
    if problems:
        raise UserError(problems)
    return SearchPlan(s, task, space, space_path, tracking_uri, generation,
                      trial_config(s, space.alpha.values()), requests)


def dataset_requests(generation: GenerationConfig, space: SearchSpace | None
                     ) -> tuple[dict[str, GenerationConfig], list[str]]:
    """The generation request of every dataset the search space can ask for, by generation key
    (the search's own request when the space has no generation dimension); a dimension whose
    setting this generation config does not have is a problem."""
    combos = space.generation_requests() if space is not None else [{}]
    known = {f.name for f in dataclasses.fields(GenerationConfig)}
    missing = sorted({k for c in combos for k in c} - known)
    if missing:
        return {}, [f"{space.source}: generation setting(s) {', '.join(missing)} are not supported "
                    "by this version's generator config"]
    return {generation_key(c): dataclasses.replace(generation, **c) for c in combos}, []


def _real_split_problems(train: TrainConfig, task: Task | None) -> list[str]:
    problems = []
    for flag, path in (("--real-test", train.real_test), ("--real-val", train.real_val)):
        if path and ":" not in path.split("/")[0] and not Path(path).exists():
            problems.append(f"{flag} {path}: no such file or folder")
        elif path and task is not None:
            problems += real_split_problems(task, path, flag[len("--real-"):])
    return problems


def _generation_problems(generation: GenerationConfig) -> list[str]:
    """The request's own fields, then the generator's weights (offline: fails fast, before Ray),
    then what would fail only once generation runs: class names the shapes generator cannot
    draw, an item list that cannot fit in this machine's memory."""
    problems = [f"generation: {p}" for p in generation.validate()]
    if problems:
        return problems
    try:
        task, _ = check_request(generation, label=lambda f: f"generation.{f}")
    except UserError as e:  # the task and the storage were checked by plan_search itself
        return [p for p in e.problems if p.startswith(("generator", "generation."))]
    return request_size_problems(generation, task)




# ----------------------------------------------------------------- 2. the cluster --

def check_cluster(plan: SearchPlan) -> dict[str, float]:
    """Step 2: Ray, then what the cluster must offer: shared storage on several nodes, room for
    one trial, and a training config every trial can start with."""
    s = plan.settings
    raylocal.init(s.address, log_to_driver=s.verbose)
    console.add_note(f"workers' output: Ray's session logs in {ray_logs_dir()}")
    cap = cluster_capacity()
    problems = check_shared_storage(s.storage)
    if s.resource_check:
        problems += check_trial_resources(plan.trial, cap)
    problems += [f"trial: {p}" for p in plan.trial.validate()]
    if problems:
        raise UserError(problems)
    return cap


def check_only_line(plan: SearchPlan, cap: dict[str, float]) -> str:
    return (f"ok: task {plan.task.name} ({plan.task.num_classes} classes), search space "
            f"{plan.space_path} ({', '.join(plan.space.parameters)}; alpha {plan.space.alpha.values()}), "
            f"cluster {cap['cpus']:g} CPUs / {cap['gpus']:g} GPUs")


def smoke_note(plan: SearchPlan) -> str | None:
    if plan.settings.preset == "smoke" and plan.task.name != "shapes":
        return (f"note: --preset smoke on {plan.task.name!r} runs the pipeline on tiny *random* "
                "models (a plumbing check: its accuracies are noise). For numbers that mean "
                "something offline, run: python -m regft.tune shapes --preset smoke")
    return None


# ------------------------------------------------------------------ 3. the layout --

@dataclass(frozen=True)
class SearchLayout:
    """Where one search lives, under one storage root (local path or URI)."""

    name: str
    root: str
    searches_root: str
    train_root: str  # the trials' Ray Train runs
    experiment_path: str  # Tune's state of this search
    study_url: str  # Optuna's study (sqlite)
    export_dir: str  # the delivered model


def layout_search(plan: SearchPlan) -> SearchLayout:
    """Step 3: the search's name and folders; refuses a new search over an existing one and a
    resume of a search that does not exist."""
    s = plan.settings
    root = store.absolute(s.storage)
    searches_root = store.join(root, "searches")
    name = resolve_search_name(s, searches_root, plan.task.name)
    experiment_path = store.join(searches_root, name)
    exists = tune.Tuner.can_restore(experiment_path)
    if s.resume and not exists:
        raise UserError(f"--resume: no search state at {experiment_path}")
    if exists and not s.resume:
        raise UserError(f"search {name!r} already exists at {experiment_path}: pass --resume to "
                        "continue it, or a new --name")
    if s.resume:  # before the parent run, the dataset or any folder: nothing new yet
        problems = state_problems(experiment_path) + foreign_search_problems(plan, name, experiment_path)
        if problems:
            raise UserError(problems)
    if store.is_uri(root):
        # Optuna needs a database file, and on a cluster the job's working directory is a
        # temporary copy: the study and the export stay in the driver's home (the head node),
        # where --resume finds them
        study_dir = Path.home() / ".regft" / "optuna"
        export_dir = str(raylocal.outputs_dir() / "exports" / name)
    else:
        study_dir = Path(root) / "optuna"
        export_dir = store.join(root, "exports", name)
    study_dir.mkdir(parents=True, exist_ok=True)
    return SearchLayout(name, root, searches_root, store.join(root, "train"), experiment_path,
                        f"sqlite:///{study_dir / (name + '.db')}", export_dir)


def resolve_search_name(s: SearchSettings, searches_root: str, task_name: str) -> str:
    """--name, else on --resume the latest search of this task (by when its state was last
    written, not by name: names hold the preset before the time), else a new timestamped name."""
    if s.name:
        return s.name
    if s.resume:
        fs, root = pafs.FileSystem.from_uri(searches_root)
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        mine = [(_last_written(fs, i.path), i.base_name) for i in infos
                if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{task_name}-")
                and tune.Tuner.can_restore(store.join(searches_root, i.base_name))]
        if not mine:
            raise UserError(f"--resume: no search of task {task_name!r} under {searches_root}; "
                            "start one without --resume")
        return max(mine)[1]
    return f"{task_name}-{s.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _last_written(fs: pafs.FileSystem, folder: str) -> float:
    """When a search's state was last written: its newest file directly in its folder."""
    infos = fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.type == pafs.FileType.File and i.mtime]
    return max(times, default=0.0)


SEARCH_FILE = "regft_search.json"  # next to Tune's state: the task a search was started for
# Tune's state files that a restore reads, the newest of each pattern (regft's own is checked by
# foreign_search_problems)
TUNE_STATE = {"tuner.pkl": "pickle", "experiment_state-*.json": "json",
              "search_gen_state-*.json": "pickle",  # a pickle despite its name
              "searcher-state-*.pkl": "pickle"}


def state_problems(experiment_path: str) -> list[str]:
    """Tune's saved state that would fail Tuner.restore: the newest file of each kind must parse
    (JSON) or unpickle (Tune's own pickles, which a restore unpickles anyway)."""
    import fnmatch
    import pickle

    fs, root = pafs.FileSystem.from_uri(experiment_path)
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if i.type == pafs.FileType.File]
    problems = []
    for pattern, kind in TUNE_STATE.items():
        matches = sorted(n for n in names if fnmatch.fnmatch(n, pattern))
        if not matches:
            continue
        try:
            with fs.open_input_stream(f"{root}/{matches[-1]}") as f:
                data = f.read()
            if kind == "json":
                if not isinstance(json.loads(data), dict):
                    raise ValueError("not a JSON object")
            else:
                pickle.loads(data)  # noqa: S301 (Tune's own state; Tuner.restore unpickles it)
        except Exception as e:  # any parse error means the same: this state cannot be restored
            problems.append(f"--resume: the search state at {experiment_path} is corrupt: "
                            f"{matches[-1]} ({type(e).__name__}: {shorten(str(e), 80)}); restore "
                            "that file from a backup, or start a new search (a new --name)")
    return problems


def foreign_search_problems(plan: SearchPlan, name: str, experiment_path: str) -> list[str]:
    """A search started for another task (or other classes) is not resumed as this one: it would
    finish that task's trials and register its model under this task's name."""
    recorded = read_search_file(experiment_path) or _task_from_mlflow(plan, name)
    if recorded is None:
        return []  # a search from before SEARCH_FILE, unknown to this store: nothing to compare
    task, names = recorded.get("task"), recorded.get("classnames")
    if task != plan.task.name:
        return [f"--resume --name {name}: that search was started for task {shorten(task)}, not "
                f"{plan.task.name!r}; resume it with that task (python -m regft.tune {task} "
                "--resume --name ...) or choose another --name"]
    if names is not None and list(names) != list(plan.task.classnames):
        return [f"--resume --name {name}: that search was started with {len(names)} classes of "
                f"task {task!r}, this one has {plan.task.num_classes}; give the same --classnames "
                "/ --max-classes as when it started"]
    return []


def read_search_file(experiment_path: str) -> dict | None:
    fs, root = pafs.FileSystem.from_uri(experiment_path)
    path = f"{root}/{SEARCH_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    try:
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise UserError(f"--resume: {experiment_path}/{SEARCH_FILE} is corrupt "
                        f"({shorten(str(e), 80)})") from e
    return data if isinstance(data, dict) else None


def write_search_file(plan: SearchPlan, layout: SearchLayout) -> None:
    fs, root = pafs.FileSystem.from_uri(layout.experiment_path)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{SEARCH_FILE}") as f:
        f.write(json.dumps({"task": plan.task.name,
                            "classnames": list(plan.task.classnames)}).encode())


def _task_from_mlflow(plan: SearchPlan, name: str) -> dict | None:
    """The task tag of the search's parent run, in any experiment of the tracking store (a search
    started before SEARCH_FILE existed); None if the store has none (a sqlite store that does not
    exist is not created)."""
    uri = plan.tracking_uri
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return None
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{SEARCH_TAG}` = '{name}' and "
                              "tags.`regft.role` = 'search'", max_results=1) if ids else []
    task = runs[0].data.tags.get("regft.task") if runs else None
    return {"task": task} if task else None


# -------------------------------------------------------------- 4. the parent run --

@dataclass(frozen=True)
class ParentRun:
    client: MlflowClient
    experiment: str
    experiment_id: str
    run_id: str


def open_parent_run(plan: SearchPlan, layout: SearchLayout) -> ParentRun:
    """Step 4: find (on --resume) or create the search's MLflow run, with the settings as params."""
    s = plan.settings
    client = MlflowClient(plan.tracking_uri)
    experiment = s.experiment or f"regft-{plan.task.name}"
    exp_id = get_or_create_experiment(client, experiment,
                                      store.join(layout.root, "mlflow-artifacts", experiment))
    tags = {SEARCH_TAG: layout.name, "regft.role": "search"}
    run = find_run(client, exp_id, tags)
    if run is None:
        run = client.create_run(exp_id, run_name=f"search-{layout.name}",
                                tags={**tags, "regft.task": plan.task.name,
                                      WEIGHTS_TAG: weights_label(s)})
        for k, v in flat_params(search_params(plan)).items():
            client.log_param(run.info.run_id, k, v)
    client.update_run(run.info.run_id, status="RUNNING")
    return ParentRun(client, experiment, exp_id, run.info.run_id)


# ---------------------------------------------------------------- 5. the dataset --

@dataclass(frozen=True)
class SearchDatasets:
    """The datasets of one search: generation key -> lineage (its path, counts, what was made)."""

    by_key: dict[str, DatasetLineage]

    def paths(self) -> dict[str, str]:
        return {k: d.path for k, d in self.by_key.items()}

    def for_config(self, config: Mapping[str, Any]) -> DatasetLineage:
        """The dataset a trial of sampled `config` trains on."""
        return self.by_key[generation_key(generation_fields(split_config(dict(config))[1]))]

    @property
    def generated(self) -> int:
        return sum(d.generated for d in self.by_key.values())


def prepare_datasets(plan: SearchPlan, parent: ParentRun) -> SearchDatasets:
    """Step 5: every dataset the search space can ask for, made complete before any trial starts
    (largest images_per_class first: a smaller count of otherwise equal settings is then its
    first images per class, 0 generated; only what is missing is generated, once even when
    another search asks for the same dataset at the same time: regft.generate's claim). The
    trials only read complete datasets, so no trial waits for generation or holds resources it
    needs (docs/ARCHITECTURE.md, "Generation in a search"). Each is logged as an input of the
    parent run; `datasets.json` lists them with what this search generated for each."""
    t0, by_key = time.time(), {}
    for key, request in plan.requests.items():
        res = generate_dataset(request)
        varied = json.loads(key)
        by_key[key] = DatasetLineage(
            dataset_id=res.dataset_id, path=res.path, images=res.total, generated=res.generated,
            splits=store.split_counts(res.path, plan.trial.val_fraction), settings=varied,
            derived_from=(res.manifest.get("derived_from") or {}).get("dataset_id"))
        what = (f"generated {res.generated}" if res.generated else
                f"served from {by_key[key].derived_from}" if by_key[key].derived_from else "reused")
        print(f"dataset {res.dataset_id}{' ' + key if varied else ''}: {res.total} images, {what}")
    datasets = SearchDatasets(by_key)
    log_search_datasets(parent, datasets)
    print(f"datasets: {len(by_key)} ready in {time.time() - t0:.0f} s, {datasets.generated} images "
          "generated")
    return datasets


def log_search_datasets(parent: ParentRun, datasets: SearchDatasets) -> None:
    """The parent run's record of the datasets: inputs (MLflow's Datasets column), datasets.json,
    `images_generated`; one dataset also as the `dataset_id` param and `regft.dataset` tag."""
    client, run_id = parent.client, parent.run_id
    lineages = list(datasets.by_key.values())
    log_datasets(client, run_id, lineages, "search")
    client.log_dict(run_id, [dataclasses.asdict(d) for d in lineages], "datasets.json")
    client.log_metric(run_id, "images_generated", float(datasets.generated))
    client.log_metric(run_id, "datasets", float(len(lineages)))
    if len(lineages) == 1:
        client.set_tag(run_id, "regft.dataset", redact(lineages[0].path))
        if "dataset_id" not in client.get_run(run_id).data.params:  # a resumed search has it
            client.log_param(run_id, "dataset_id", lineages[0].dataset_id)


# ------------------------------------------------------------------ 6. the tuner --

def trial_fn(config: dict, base: dict, datasets: dict[str, str], train_storage: str, search_name: str,
             shared: str | None = None):
    """One Tune trial: one Ray Train fine-tune (+ alpha sweep) of the sampled configuration.

    Ray's guides call this the train driver function. It runs as a Tune function trainable;
    `TuneReportCallback` forwards every `ray.train.report` of rank 0 to Tune. The Train run is
    named from the trial id (no timestamp), so a restarted trial (driver killed, `--resume`) finds
    its run folder and resumes from its last checkpoint. (The name stays `trial_fn`: Tune names
    the trials' folders after it, `searches/<name>/trial_fn_<id>`.) `shared`: the search's
    shared zero-shot work (prepare_shared_work), read by the trial instead of recomputed.
    `datasets`: generation key -> complete dataset (prepare_datasets); the trial trains on the one
    of its sampled generation values (none sampled: the search's one dataset, key "{}").
    """
    started = time.time()  # the trial's phases (regft.phases) start here
    trial_id = tune.get_context().get_trial_id()
    train_values, generation_values = split_config(config)
    cfg = TrainConfig.from_dict({**base, **train_values}, where=f"trial {trial_id}")
    dataset_path = datasets[generation_key(generation_fields(generation_values))]
    run_config = ray.train.RunConfig(
        name=f"{search_name}-{trial_id}",
        storage_path=train_storage,
        callbacks=[TuneReportCallback()],
        failure_config=ray.train.FailureConfig(max_failures=TRIAL_MAX_FAILURES),
    )
    with unwrapped_user_errors():  # a worker's user error: the trial's error is its one line
        build_trainer(cfg, dataset_path, run_config, started=started, shared=shared).fit()


def prepare_shared_work(layout: SearchLayout) -> str:
    """Step 6a: where the trials keep the work that is the same in all of them (the zero-shot
    head, the decoded evaluation splits, theta_0's accuracy per split; regft.shared_work): one
    folder under the storage root, content-addressed, so a resumed or a second search reuses it.
    The first trial that needs an entry computes and stores it; the others read it."""
    return store.join(layout.root, "shared")


def build_tuner(plan: SearchPlan, layout: SearchLayout, parent: ParentRun, datasets: SearchDatasets,
                cap: dict[str, float]) -> tune.Tuner:
    """Step 6: the trainable (a trial driver holding TRIAL_DRIVER_CPU), the MLflow callback, and a
    new Tuner (seeded TPE behind a concurrency limit, ASHA or FIFO) or the restored one."""
    s = plan.settings
    base = plan.trial.to_dict()
    static = {**base, "alpha_grid": str(plan.trial.alpha_grid), "generator": plan.generation.generator,
              "search": layout.name}  # + each trial's dataset_id (MLflowTrialCallback)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base=base, datasets=datasets.paths(),
                             train_storage=layout.train_root, search_name=layout.name,
                             shared=prepare_shared_work(layout)),
        {"cpu": TRIAL_DRIVER_CPU},
    )
    callback = MLflowTrialCallback(plan.tracking_uri, parent.experiment_id, parent.run_id, static,
                                   layout.name, datasets.by_key)
    n_conc = max_concurrent_trials(plan.trial, cap, s.num_samples, s.max_concurrent)
    print(f"search {layout.name}: {s.num_samples} trials, up to {n_conc} at a time, scheduler "
          f"{s.scheduler}, sampler {s.sampler}; MLflow experiment {parent.experiment!r} at "
          f"{redact(plan.tracking_uri)}")
    if s.resume:
        print(f"resuming search {layout.name} from {layout.experiment_path}")
        return tune.Tuner.restore(layout.experiment_path, trainable=trainable,
                                  param_space=plan.space.to_tune(), resume_unfinished=True,
                                  resume_errored=True)
    searcher = make_searcher(SELECT, "max", s.seed, layout.study_url, study_name=layout.name,
                             sampler=s.sampler)
    # a trial reports once per epoch and once more after the last (the ensembled final report)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=plan.trial.epochs + 1,
                               grace_period=1, reduction_factor=2)
                 if s.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=plan.space.to_tune(),
        tune_config=tune.TuneConfig(
            metric=SELECT, mode="max", num_samples=s.num_samples,
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=n_conc),
            scheduler=scheduler, max_concurrent_trials=n_conc,
        ),
        run_config=tune.RunConfig(name=layout.name, storage_path=layout.searches_root,
                                  callbacks=console_callbacks(plan) + [PhaseCallback(callback), callback],
                                  verbose=1 if s.verbose else 0),
    )


def console_callbacks(plan: SearchPlan) -> list:
    """One line per epoch per trial and per trial end, Tune's table now and then (regft.console_ray);
    none with --verbose (Tune's own output, verbose=1)."""
    s = plan.settings
    if s.verbose:
        return []
    # a failed trial's line (TrialLines) names its error and its error file; Tune's own print of
    # the whole traceback (read by tuner.fit) would bury the console
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    return [TrialLines(epochs=plan.trial.epochs,
                       stopper="ASHA" if s.scheduler == "asha" else "the scheduler")]


def search_log(layout: SearchLayout) -> Path:
    """search.log next to the search's state; for a URI storage root, in the driver's home."""
    if store.is_uri(layout.root):
        return Path.home() / ".regft" / "logs" / f"{layout.name}.log"
    return Path(layout.experiment_path) / "search.log"


# ---------------------------------------------------------------- 7. the results --

def error_line(error: BaseException) -> str:
    """A failed trial's error as one line: a user error's own message (not the remote traceback
    Ray wraps it in), else the exception line that ends the error's text."""
    user = user_error_in(error)
    if user is not None:
        return "; ".join(getattr(user, "problems", None) or str(user).splitlines())
    return last_line(str(error)) or type(error).__name__

@dataclass(frozen=True)
class TrialOutcome:
    """One trial as the search ended it: its sampled config and its last report (typed)."""

    trial_id: str | None
    config: dict[str, Any]
    report: Report | None  # None: the trial reported nothing (it failed first)
    error: str = ""

    @property
    def final(self) -> bool:
        return isinstance(self.report, FinalReport)

    @property
    def diverged(self) -> bool:
        return isinstance(self.report, DivergedReport)

    @classmethod
    def from_result(cls, r) -> TrialOutcome:
        """From a Tune `Result` (its metrics are the trial's last result)."""
        metrics = r.metrics or {}
        # every report carries its epoch; a trial that failed before its first report has only
        # Tune's bookkeeping keys
        return cls(trial_id=metrics.get("trial_id"), config=dict(r.config or {}),
                   report=parse_result(metrics, "trial result") if "epoch" in metrics else None,
                   error=error_line(r.error) if r.error else "")

    def row(self) -> dict[str, Any]:
        """The trial as one results.csv row: config values as `config/<name>`, then the report."""
        return {"trial_id": self.trial_id, "final": self.final,
                "epochs_run": self.report.epoch if self.report else None, "error": self.error,
                "diverged": self.diverged, **{f"config/{k}": v for k, v in self.config.items()},
                **(self.report.to_dict() if self.report else {})}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> TrialOutcome:
        """Back from a row; its report is read when the row holds a final one (`final` true)."""
        config = {str(k)[len("config/"):]: v for k, v in row.items() if str(k).startswith("config/")}
        wire = {k: v for k, v in row.items() if k not in ROW_KEYS and not str(k).startswith("config/")}
        # a row without `final` (a stub, or a trial that did not finish) has no final report
        report = (FinalReport.from_dict({**wire, **FinalReport.WIRE}, "results row")
                  if row.get("final") else None)
        return cls(row["trial_id"], config, report)


ROW_KEYS = ("trial_id", "final", "epochs_run", "error", "diverged")


@dataclass
class SearchOutcome:
    trials: list[TrialOutcome]
    table: pd.DataFrame  # results.csv
    best: TrialOutcome | None
    diverged: list[str]
    orphans: list[str]


def collect_results(results, plan: SearchPlan, layout: SearchLayout, parent: ParentRun) -> SearchOutcome:
    """Step 7: every trial's outcome; runs and study trials left RUNNING by a driver that died are
    closed (fit() has returned, so nothing still marked running is); the best finished trial."""
    trials = [TrialOutcome.from_result(r) for r in results]
    diverged = [str(t.trial_id) for t in trials if t.diverged]
    if diverged:  # NaN/inf loss: stopped by the trial itself, PRUNED in Optuna, tagged in MLflow
        print(f"note: {len(diverged)} trial(s) diverged (NaN/inf loss) and were stopped: "
              + ", ".join(diverged))
    parent.client.log_metric(parent.run_id, "trials_diverged", float(len(diverged)))
    # trials started just before a driver crash and lost from Tune's saved state (a resumed
    # search replaced them)
    orphans = close_orphan_runs(parent.client, parent.experiment_id, parent.run_id,
                                [t.trial_id for t in trials])
    fail_running_trials(layout.study_url, layout.name)
    if orphans:
        print(f"note: {len(orphans)} trial(s) started before the driver died were not in the saved "
              f"search state and were replaced: {', '.join(map(str, orphans))} (MLflow: KILLED, "
              "regft.outcome=orphaned)")
    return SearchOutcome(trials, results_frame(trials), best_finished(trials), diverged, orphans)


def results_frame(trials: list[TrialOutcome]) -> pd.DataFrame:
    """results.csv: one row per trial; each alpha curve is one JSON cell ([[alpha, accuracy], ...])."""
    rows = [{k: json.dumps(v) if k.startswith("alpha_curve") else v for k, v in t.row().items()}
            for t in trials]
    return pd.DataFrame(rows, columns=None if rows else list(ROW_KEYS))


def best_finished(trials: list[TrialOutcome]) -> TrialOutcome | None:
    """The finished trial with the highest selection value (never a real-test number); the first
    of equals."""
    done = [t for t in trials if t.final and not math.isnan(t.report.select_metric)]
    return max(done, key=lambda t: t.report.select_metric) if done else None


def end_parent_run(parent: ParentRun, error: BaseException) -> None:
    """Mark the parent run of a search that stopped with `error`: KILLED for Ctrl-C, else FAILED
    (`--resume` sets it RUNNING again). Best effort: the error itself is what the user sees."""
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    try:
        parent.client.set_tag(parent.run_id, "regft.outcome",
                              f"{type(error).__name__}: {shorten(str(error), 200)}")
        parent.client.set_terminated(parent.run_id, status=status)
    except Exception as e:  # the store itself failing must not hide the search's error
        print(f"warning: could not mark MLflow run {parent.run_id} {status}: {type(e).__name__}",
              file=sys.stderr)


def fail_search(layout: SearchLayout, parent: ParentRun, outcome: SearchOutcome) -> int:
    parent.client.set_tag(parent.run_id, "regft.outcome", "no trial finished")
    parent.client.set_terminated(parent.run_id, status="FAILED")
    errors = list(dict.fromkeys(t.error for t in outcome.trials if t.error))  # distinct, in order
    why = ""
    if errors:
        more = f" (and {len(errors) - 1} other error(s))" if len(errors) > 1 else ""
        why = f"; trial error: {cut(errors[0], ERROR_CHARS)}{more}"
    print(f"error: no trial of search {layout.name} finished{why}; see {layout.experiment_path}",
          file=sys.stderr)
    return 1


# ------------------------------------------------------------- 8. the deliverable --

def deliver(plan: SearchPlan, layout: SearchLayout, parent: ParentRun, outcome: SearchOutcome,
            results, datasets: SearchDatasets) -> str:
    """Step 8: the summary and the parent run's artifacts, then the best ensembled model exported
    and registered (a failed export is a warning: the search's results stand). Returns what to
    print."""
    best = outcome.best
    dataset_path = datasets.for_config(best.config).path  # the data the best trial trained on
    parent.client.log_param(parent.run_id, "best/dataset_id", Path(dataset_path).name)
    summary = summary_table(best.row(), layout.name, plan.tracking_uri, parent.run_id)
    if weights_label(plan.settings) == RANDOM_WEIGHTS:
        summary += f"\n  {RANDOM_WEIGHTS_NOTE}"
    log_parent(parent, plan.space, outcome, layout.study_url, layout.name, dataset_path, summary)
    s = plan.settings
    real_test = s.train.real_test or (plan.task.real_test if plan.task.real_test == SHAPES_REAL else None)
    delivered = deliver_best(
        results, best.row(), client=parent.client, tracking_uri=plan.tracking_uri,
        parent_id=parent.run_id, search_name=layout.name,
        trial_run_root=store.join(layout.train_root, f"{layout.name}-{best.trial_id}"),
        export_dir=layout.export_dir, registered_name=f"regft-{plan.task.name}", task=plan.task,
        dataset_path=dataset_path,
        evaluation={"real_test": real_test, "eval_batch_size": plan.trial.eval_batch_size,
                    "device": "cuda" if plan.trial.use_gpu else "cpu"})
    parent.client.set_terminated(parent.run_id, status="FINISHED")
    if delivered["export"]:
        where = delivered["model_uri"] or delivered["export"]
        summary += (f"\n  model: {delivered['export']}"
                    + (f" (registered as {where})" if delivered["model_uri"] else "")
                    + f"\n  use it: python -m regft.predict {where} IMAGE...")
    return summary


def _curve_lines(report: FinalReport) -> list[str]:
    """Accuracy against alpha for each split the trial swept: the selection split's curve (what
    alpha was picked on) next to the others (reported after the pick)."""
    curves = report.curves
    alphas = [a for a, _ in next(iter(curves.values()))]
    lines = [f"  {'alpha':<15}" + "".join(f"{a:>6.1f}" for a in alphas)]
    for split, curve in curves.items():
        peak_a, peak = max(curve, key=lambda p: (p[1], -p[0]))
        note = ("  <- selects" if split == report.selection_metric
                else f"  peak {peak:.3f} at {peak_a:.1f}, reported only")
        lines.append(f"  {split:<15}" + "".join(f"{v:>6.3f}" for _, v in curve) + note)
    return lines


def _number_lines(report: FinalReport) -> list[str]:
    header = f"  {'split':<15}{'zero-shot':>11}{'fine-tuned':>12}{'ensemble':>10}"
    lines = [header, "  " + "-" * (len(header) - 2)]
    for split in SPLITS:
        if split not in report.accuracy:
            continue
        vals = [report.acc(p, split) for p in ("zs", "ft", "ens")]
        cells = [f"{v:.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-" for v in vals]
        lines.append(f"  {split:<15}{cells[0]:>11}{cells[1]:>12}{cells[2]:>10}")
    return lines


def summary_table(best: Mapping[str, Any], search_name: str, tracking_uri: str, parent_run_id: str) -> str:
    """The printed summary of the best trial (a results row, `TrialOutcome.row()`)."""
    trial = TrialOutcome.from_row(best)
    report = trial.report
    lines = [f"Search {search_name}: best trial {trial.trial_id}"]
    chosen = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items()]
    if report is not None:
        chosen.append(f"alpha={report.best_alpha:.2f}")
    lines.append("  selected: " + ", ".join(chosen))
    if report is not None:
        lines.append(f"  selection split: {report.selection_metric}, alpha by the {report.alpha_rule} "
                     "rule (real test is reported only, never used to select)")
        lines += _number_lines(report) + _curve_lines(report)
    lines.append(f"  MLflow: parent run {parent_run_id} at {redact(tracking_uri)}")
    if tracking_uri.startswith("sqlite:///"):
        lines.append(f"  open the UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1")
    return "\n".join(lines)


def log_parent(parent: ParentRun, space: SearchSpace, outcome: SearchOutcome, study_url: str,
               study_name: str, dataset_path: str, summary: str) -> None:
    """The parent run's artifacts (space, results.csv, summary, Optuna plots, sample images) and
    the best trial's config, alpha and numbers as `best/...`."""
    client, run_id, best = parent.client, parent.run_id, outcome.best
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "search_space.yaml").write_text(space.text or json.dumps(dataclasses.asdict(space)))
        outcome.table.to_csv(tmp / "results.csv", index=False)
        (tmp / "summary.txt").write_text(summary + "\n")
        for name in ("search_space.yaml", "results.csv", "summary.txt"):
            client.log_artifact(run_id, str(tmp / name))
        for fname, fig in optuna_figures(study_url, study_name):
            client.log_figure(run_id, fig, fname)
        samples = store.fetch_file(store.join(dataset_path, store.SAMPLES), tmp / store.SAMPLES)
        if samples is not None:
            client.log_artifact(run_id, str(samples))
    for k, v in flat_params({f"best/{k}": v for k, v in best.config.items()}).items():
        client.log_param(run_id, k, v)
    client.log_param(run_id, "best/alpha", str(best.report.best_alpha))
    client.log_param(run_id, "best/trial_id", str(best.trial_id))
    for k, v in numeric_metrics(best.report.to_dict()).items():
        client.log_metric(run_id, f"best/{k}", v)
    client.log_metric(run_id, "trials_finished", float(sum(t.final for t in outcome.trials)))
    client.log_metric(run_id, "trials_total", float(len(outcome.trials)))


def optuna_figures(study_url: str, study_name: str):
    """Optuna's parameter-importance and parallel-coordinate plots (matplotlib backend; Agg, as
    regft.tracking sets it)."""
    study = optuna.load_study(study_name=study_name, storage=study_url)
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    figs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks its matplotlib backend experimental
        if len(done) >= 2 and len(study.best_trial.params) >= 1:
            try:
                figs.append(("param_importances.png", ovm.plot_param_importances(study).figure))
            except (ValueError, RuntimeError):  # e.g. all values equal: no importance defined
                pass
        if done:
            figs.append(("parallel_coordinate.png", ovm.plot_parallel_coordinate(study).figure))
    return figs


# -------------------------------------------------------------- the table of contents --

def run_search(s: SearchSettings, flag_problems: list[str] = ()) -> int:
    """The search, step by step (see the module docstring). `flag_problems`: what the command
    line found wrong with its flags, reported together with every other problem."""
    plan = plan_search(s, flag_problems)                                # 1
    cap = check_cluster(plan)                                           # 2
    if s.check_only:
        print(check_only_line(plan, cap))
        return 0
    note = smoke_note(plan)
    if note:
        print(note)
    layout = layout_search(plan)                                        # 3
    parent = open_parent_run(plan, layout)                              # 4
    try:
        write_search_file(plan, layout)
        datasets = prepare_datasets(plan, parent)                       # 5
        tuner = build_tuner(plan, layout, parent, datasets, cap)       # 6
        console.log_to(search_log(layout))  # only now: Tune creates the folder as fit() starts
        results = tuner.fit()
    except BaseException as e:  # the parent run is never left RUNNING by a failed search
        end_parent_run(parent, e)
        raise
    outcome = collect_results(results, plan, layout, parent)            # 7
    if outcome.best is None:
        return fail_search(layout, parent, outcome)
    print(deliver(plan, layout, parent, outcome, results, datasets))  # 8
    return 0
