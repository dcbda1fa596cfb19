"""The main job: `python -m regft.tune TASK` — generate once, search with Ray Tune + Optuna,
evaluate, and log everything to MLflow.

Pipeline: validate everything (exit 2 on any problem, before expensive work) -> Ray -> make sure
the generated dataset exists (Ray Data; every trial then reads the same dataset) -> search
(each trial one Ray Train fine-tune + alpha sweep; ASHA stops weak trials after any epoch;
Optuna TPE proposes lr / vc_weight / ...) -> best configuration's numbers per split -> summary
table + MLflow parent run with plots, CSV and the search space.

Examples:
    python -m regft.tune shapes --preset smoke          # offline quickstart (2 CPUs, minutes)
    python -m regft.tune cars --preset paper            # the paper's setting, on a GPU cluster
    python -m regft.tune cars --preset smoke            # plumbing check on tiny random models
    python -m regft.tune shapes --preset smoke --resume # finish an interrupted search
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regft import store
from regft.cli import UserError, entry_point, redact
from regft.resources import (
    TRIAL_DRIVER_CPU,
    check_shared_storage,
    check_trial_resources,
    cluster_capacity,
    max_concurrent_trials,
)
from regft.train import TrainConfig

SELECT = "select_metric"
SPLITS = ("synthetic_val", "real_val", "real_test")


@dataclass
class SearchSettings:
    """Everything a search needs. Defaults are the paper's setting (method.md); presets and
    flags override them, in that order."""

    task: str | None = None
    classnames: str | None = None  # a text file of class names instead of a catalog task
    max_classes: int | None = None  # use only the first N classes (smoke runs of big tasks)
    search_space: str | None = None  # default: search_spaces/<task>.yaml
    num_samples: int = 16
    max_concurrent: int | None = None  # default: as many trials as the cluster holds at once
    scheduler: str = "asha"  # asha | fifo
    workers_per_trial: int = 1
    gpus_per_trial: float = 0.0  # shared evenly by the trial's workers; > 0 trains on GPU
    cpus_per_worker: float = 1.0
    # fine-tuning (method.md)
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    epochs: int = 10
    batch_size: int = 128
    warmup_steps: int = 500
    selection_metric: str = "synthetic_val"
    alpha_rule: str = "knee"  # see regft.engine.select_alpha
    real_test: str | None = None
    real_val: str | None = None
    # generation (method.md)
    generator: str = "stabilityai/stable-diffusion-2-1-base"
    gen_options: dict = field(default_factory=dict)
    images_per_class: int = 64
    gen_resolution: int | None = None  # default: the generator's native resolution
    output_size: int | None = None  # default: 224 for real generators, native for tiny/shapes
    gen_steps: int = 50
    guidance: float = 5.0
    gen_batch_size: int = 8
    gen_actors: int | None = None
    # bookkeeping
    seed: int = 0
    storage: str = "regft_runs"  # datasets, Tune/Train state and results (local path or URI)
    tracking_uri: str | None = None  # default: sqlite file in the working directory
    experiment: str | None = None  # default: regft-<task>
    name: str | None = None  # search name; default <task>-<preset>-<time>
    preset: str | None = None
    resume: bool = False
    address: str | None = None  # Ray cluster; default RAY_ADDRESS, else a local Ray
    check_only: bool = False
    audit_log: str | None = None  # JSON lines: when each trial opened each eval split (audits)
    resource_check: bool = True

    def validate(self) -> list[str]:
        p = []
        if not self.task and not self.classnames:
            p.append("task: give a task name (e.g. cars) or --classnames FILE")
        for name in ("num_samples", "workers_per_trial", "epochs", "batch_size", "images_per_class",
                     "gen_steps", "gen_batch_size"):
            v = getattr(self, name)
            if v <= 0:
                p.append(f"--{name.replace('_', '-')}: must be > 0, got {v}")
        for name in ("max_concurrent", "gen_actors", "max_classes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                p.append(f"--{name.replace('_', '-')}: must be > 0, got {v}")
        if self.max_classes is not None and self.max_classes < 2:
            p.append(f"--max-classes: a classifier needs at least 2 classes, got {self.max_classes}")
        if self.gpus_per_trial < 0 or self.cpus_per_worker <= 0:
            p.append(f"--gpus-per-trial must be >= 0 and --cpus-per-worker > 0, got "
                     f"{self.gpus_per_trial} and {self.cpus_per_worker}")
        if self.warmup_steps < 0:
            p.append(f"--warmup-steps: must be >= 0, got {self.warmup_steps}")
        if self.gen_resolution is not None and (self.gen_resolution <= 0 or self.gen_resolution % 8):
            p.append(f"--resolution: must be a positive multiple of 8 (the VAE downsamples by 8), "
                     f"got {self.gen_resolution}")
        if self.scheduler not in ("asha", "fifo"):
            p.append(f"--scheduler: {self.scheduler!r} is not one of asha, fifo")
        if self.selection_metric not in ("synthetic_val", "real_val"):
            p.append(f"--selection-metric: {self.selection_metric!r} is not one of synthetic_val, "
                     "real_val (the real test split is never used to select)")
        if self.selection_metric == "real_val" and not self.real_val:
            p.append("--selection-metric real_val needs --real-val PATH (a labelled real validation set)")
        from regft.engine import ALPHA_RULES

        if self.alpha_rule not in ALPHA_RULES:
            p.append(f"--alpha-rule: {self.alpha_rule!r} is not one of {', '.join(ALPHA_RULES)}")
        if self.guidance < 0:
            p.append(f"--guidance: must be >= 0, got {self.guidance}")
        from regft.tasks import unsafe_name_problem

        for flag, value in (("--name", self.name), ("--experiment", self.experiment)):
            problem = unsafe_name_problem(value, flag) if value is not None else None
            if problem:  # they name folders
                p.append(problem)
        return p


def _smoke_shapes() -> dict[str, Any]:
    """The offline testbed's recipe, measured in docs/shapes-testbed.md ("Recommended
    `--preset smoke`"): gap 0.5 (fine-tuning hurts real accuracy, the ensemble gains most),
    ~150 steps (1,447 train images / 128 = 12 steps x 13 epochs), 10 % warm-up."""
    from regft.shapes import shapes_model_name

    return {
        "model": shapes_model_name(), "pretrained": None, "generator": "shapes",
        "gen_options": {"gap": 0.5}, "images_per_class": 100, "epochs": 13, "batch_size": 128,
        "cpus_per_worker": 0.45,  # + Ray Data needs one whole free CPU on 2
        "warmup_steps": 15, "num_samples": 2, "gen_steps": 1, "gen_batch_size": 64,
        "real_test": "shapes:real",
    }


PRESETS: dict[str, Any] = {
    # minutes on 2 CPUs, offline. On `shapes`: the tiny pretrained CLIP and the procedural
    # generator, where the method's effect is visible. Elsewhere: tiny random models on the
    # first 4 classes, a plumbing check whose numbers are noise.
    "smoke": lambda task: _smoke_shapes() if task == "shapes" else {
        "model": "tiny", "pretrained": None, "generator": "tiny", "images_per_class": 10,
        "max_classes": 4, "epochs": 2, "batch_size": 8, "warmup_steps": 2, "num_samples": 2,
        "cpus_per_worker": 0.45,  # + Ray Data needs one whole free CPU on 2
        "gen_steps": 2, "gen_batch_size": 8,
    },
    # the paper's setting (method.md): ViT-B/16 OpenAI, SD 2.1-base, 64 images per class,
    # batch 128, 10 epochs; one GPU per trial.
    "paper": lambda task: {
        "model": "ViT-B-16", "pretrained": "openai",
        "generator": "stabilityai/stable-diffusion-2-1-base", "images_per_class": 64,
        "epochs": 10, "batch_size": 128, "warmup_steps": 500, "gen_steps": 50, "guidance": 5.0,
        "gpus_per_trial": 1.0, "num_samples": 24,
    },
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regft.tune",
        description="Search VC weight, learning rate and ensemble alpha for name-only transfer of CLIP.",
        epilog="Flags override the preset's values, which override the paper's defaults.",
    )
    S = argparse.SUPPRESS  # unset flags stay unset, so presets can fill them
    p.add_argument("task", nargs="?", default=S,
                   help="catalog task (cars, pets, ..., shapes) or a name for --classnames")
    p.add_argument("--classnames", default=S, help="text file, one class name per line, in label order")
    p.add_argument("--preset", choices=sorted(PRESETS), default=S)
    p.add_argument("--search-space", default=S, help="YAML file (default search_spaces/<task>.yaml)")
    p.add_argument("--num-samples", type=int, default=S, help="number of trials")
    p.add_argument("--max-concurrent", type=int, default=S)
    p.add_argument("--scheduler", choices=["asha", "fifo"], default=S)
    p.add_argument("--workers-per-trial", type=int, default=S)
    p.add_argument("--gpus-per-trial", type=float, default=S)
    p.add_argument("--cpus-per-worker", type=float, default=S)
    p.add_argument("--model", default=S)
    p.add_argument("--pretrained", default=S)
    p.add_argument("--epochs", type=int, default=S)
    p.add_argument("--batch-size", type=int, default=S)
    p.add_argument("--warmup-steps", type=int, default=S)
    p.add_argument("--selection-metric", default=S)
    p.add_argument("--alpha-rule", default=S, help="knee (default), 1se or argmax, on the selection split")
    p.add_argument("--real-test", default=S, help="real test split (only reported)")
    p.add_argument("--real-val", default=S, help="labelled real validation split (may select)")
    p.add_argument("--max-classes", type=int, default=S)
    p.add_argument("--generator", default=S)
    p.add_argument("--gap", type=float, default=S, help="shapes generator: domain gap in [0, 1]")
    p.add_argument("--images-per-class", type=int, default=S)
    p.add_argument("--resolution", dest="gen_resolution", type=int, default=S)
    p.add_argument("--steps", dest="gen_steps", type=int, default=S)
    p.add_argument("--guidance", type=float, default=S)
    p.add_argument("--gen-batch-size", type=int, default=S)
    p.add_argument("--gen-actors", type=int, default=S)
    p.add_argument("--seed", type=int, default=S)
    p.add_argument("--storage", default=S, help="local path or URI (s3://...) for datasets and search state")
    p.add_argument("--tracking-uri", default=S, help="MLflow tracking URI (default: ./mlflow.db)")
    p.add_argument("--experiment", default=S)
    p.add_argument("--name", default=S, help="search name (default <task>-<preset>-<time>)")
    p.add_argument("--resume", action="store_true", default=S,
                   help="continue the search --name (or the latest one of this task)")
    p.add_argument("--address", default=S, help="Ray cluster address (default RAY_ADDRESS or local)")
    p.add_argument("--check-only", action="store_true", default=S, help="validate and exit")
    p.add_argument("--audit-log", default=S,
                   help="append when each trial opened each eval split (JSON lines) to this file")
    p.add_argument("--no-resource-check", dest="resource_check", action="store_false", default=S,
                   help="skip the cluster-capacity check (autoscaling clusters)")
    return p


def settings_from_argv(argv: list[str] | None, validate: bool = True) -> SearchSettings:
    """Flags over preset over defaults. `validate=False` leaves the flag checks to run_search,
    which reports them together with every other problem."""
    ns = vars(build_parser().parse_args(argv))
    gap = ns.pop("gap", None)
    task = ns.get("task")
    preset = ns.get("preset")
    values: dict[str, Any] = dict(PRESETS[preset](task)) if preset else {}
    values.update(ns)
    if gap is not None:
        values["gen_options"] = {**values.get("gen_options", {}), "gap": gap}
    s = SearchSettings(**values)
    problems = s.validate() if validate else []
    if problems:
        raise UserError(problems)
    return s


# ----------------------------------------------------------------------------- helpers --

def _now() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def init_ray(address: str | None):
    from regft import raylocal

    return raylocal.init(address)


# ------------------------------------------------------------------------------ trial --

def trial_fn(config: dict, base: dict, dataset_path: str, train_storage: str, search_name: str):
    """One Tune trial: one Ray Train fine-tune (+ alpha sweep) of the sampled configuration.

    Runs as a Tune function trainable; `TuneReportCallback` forwards every `ray.train.report`
    of rank 0 to Tune. The Train run is named from the trial id (no timestamp), so a restarted
    trial (driver killed, `--resume`) finds its run folder and resumes from its last checkpoint.
    """
    import ray.train
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from regft.config import from_dict
    from regft.train import build_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = from_dict(TrainConfig, {**base, **config}, where=f"trial {trial_id}")
    run_config = ray.train.RunConfig(
        name=f"{search_name}-{trial_id}",
        storage_path=train_storage,
        callbacks=[TuneReportCallback()],
        failure_config=ray.train.FailureConfig(max_failures=2),
    )
    build_trainer(cfg, dataset_path, run_config).fit()


# ------------------------------------------------------------------------------ search --

def resolve_search_name(s: SearchSettings, searches_root: str, task_name: str) -> str:
    """--name, else on --resume the latest search of this task, else a new timestamped name."""
    if s.name:
        return s.name
    if s.resume:
        import pyarrow.fs as pafs

        fs, root = pafs.FileSystem.from_uri(searches_root)
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
        mine = sorted(i.base_name for i in infos
                      if i.type == pafs.FileType.Directory and i.base_name.startswith(f"{task_name}-"))
        if not mine:
            raise UserError(f"--resume: no search of task {task_name!r} under {searches_root}; "
                            "start one without --resume")
        return mine[-1]  # names end in a sortable timestamp
    return f"{task_name}-{s.preset or 'custom'}-{_now()}"


def _train_base(s: SearchSettings, task_args: dict, alpha_values: list[float]) -> dict:
    """Fixed (not searched) training settings shared by all trials."""
    return {
        **task_args,
        "model": s.model,
        "pretrained": s.pretrained,
        "epochs": s.epochs,
        "batch_size": s.batch_size,
        "warmup_steps": s.warmup_steps,
        "num_workers": s.workers_per_trial,
        "use_gpu": s.gpus_per_trial > 0,
        "gpus_per_worker": s.gpus_per_trial / s.workers_per_trial if s.gpus_per_trial > 0 else 0.0,
        "cpus_per_worker": s.cpus_per_worker,
        "selection_metric": s.selection_metric,
        "alpha_rule": s.alpha_rule,
        "real_test": s.real_test,
        "real_val": s.real_val,
        "alpha_grid": list(alpha_values),
        "seed": s.seed,
        "audit_log": str(Path(s.audit_log).resolve()) if s.audit_log else None,
    }


def _results_frame(results) -> Any:
    import pandas as pd

    rows = []
    for r in results:
        m = dict(r.metrics or {})
        cfg = {f"config/{k}": v for k, v in (r.config or {}).items()}
        row = {"trial_id": m.get("trial_id"), "final": bool(m.get("final")),
               "epochs_run": m.get("epoch"), "error": str(r.error).splitlines()[0] if r.error else "",
               "diverged": bool(m.get("diverged")),
               **cfg}
        for k, v in m.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in row:
                row[k] = v
            elif k in ("selection_metric", "alpha_rule") and isinstance(v, str):
                row[k] = v
            elif k.startswith("alpha_curve") and isinstance(v, (list, tuple)):
                row[k] = json.dumps(v)  # [[alpha, accuracy], ...], one cell in results.csv
        rows.append(row)
    return pd.DataFrame(rows)


def best_finished(df):
    """The finished trial with the highest selection value (never a real-test number)."""
    done = df[df["final"] & df[SELECT].notna()] if SELECT in df else df.iloc[0:0]
    if done.empty:
        return None
    return done.sort_values(SELECT, ascending=False, kind="stable").iloc[0]


def _curve_lines(best) -> list[str]:
    """Accuracy against alpha for each split the trial swept: the selection split's curve
    (what alpha was picked on) next to the others (reported after the pick)."""
    select = best.get("selection_metric", "synthetic_val")
    curves = {}
    for key, split in (("alpha_curve", select), *((f"alpha_curve_{x}", x) for x in SPLITS)):
        raw = best.get(key)
        if isinstance(raw, str) and split not in curves:
            curves[split] = json.loads(raw)
    if not curves:
        return []
    alphas = [a for a, _ in next(iter(curves.values()))]
    lines = [f"  {'alpha':<15}" + "".join(f"{a:>6.1f}" for a in alphas)]
    for split, curve in curves.items():
        peak_a, peak = max(curve, key=lambda p: (p[1], -p[0]))
        note = "  <- selects" if split == select else f"  peak {peak:.3f} at {peak_a:.1f}, reported only"
        lines.append(f"  {split:<15}" + "".join(f"{v:>6.3f}" for _, v in curve) + note)
    return lines


def summary_table(best, search_name: str, tracking_uri: str, parent_run_id: str) -> str:
    lines = [f"Search {search_name}: best trial {best['trial_id']}"]
    params = {k[len('config/'):]: v for k, v in best.items() if str(k).startswith("config/")}
    lines.append("  selected: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in params.items())
                 + f", alpha={best.get('best_alpha', float('nan')):.2f}")
    lines.append(f"  selection split: {best.get('selection_metric', 'synthetic_val')}, alpha by the "
                 f"{best.get('alpha_rule', 'knee')} rule (real test is reported only, never used to select)")
    header = f"  {'split':<15}{'zero-shot':>11}{'fine-tuned':>12}{'ensemble':>10}"
    lines += [header, "  " + "-" * (len(header) - 2)]
    for split in SPLITS:
        vals = [best.get(f"{p}_{split}_acc") for p in ("zs", "ft", "ens")]
        if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in vals):
            continue
        cells = [f"{v:.4f}" if isinstance(v, (int, float)) and not math.isnan(v) else "-" for v in vals]
        lines.append(f"  {split:<15}{cells[0]:>11}{cells[1]:>12}{cells[2]:>10}")
    lines += _curve_lines(best)
    lines.append(f"  MLflow: parent run {parent_run_id} at {redact(tracking_uri)}")
    if tracking_uri.startswith("sqlite:///"):
        lines.append(f"  open the UI: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1")
    return "\n".join(lines)


def _log_parent(client, parent_id: str, s: SearchSettings, space, df, best, study_url, study_name,
                dataset_path: str, summary: str):
    import tempfile

    from regft.tracking import flat_params, numeric_metrics

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "search_space.yaml").write_text(space.text or json.dumps(dataclasses.asdict(space)))
        df.to_csv(tmp / "results.csv", index=False)
        (tmp / "summary.txt").write_text(summary + "\n")
        for name in ("search_space.yaml", "results.csv", "summary.txt"):
            client.log_artifact(parent_id, str(tmp / name))
        for fname, fig in optuna_figures(study_url, study_name):
            client.log_figure(parent_id, fig, fname)
        samples = store.fetch_file(store.join(dataset_path, "samples.png"), tmp / "samples.png")
        if samples is not None:
            client.log_artifact(parent_id, str(samples))
    if best is not None:
        for k, v in flat_params({f"best/{k[len('config/'):]}": v for k, v in best.items()
                                 if str(k).startswith("config/")}).items():
            client.log_param(parent_id, k, v)
        client.log_param(parent_id, "best/alpha", str(best.get("best_alpha")))
        client.log_param(parent_id, "best/trial_id", str(best.get("trial_id")))
        for k, v in numeric_metrics(best.to_dict()).items():
            if not k.startswith("config/"):
                client.log_metric(parent_id, f"best/{k}", v)
    client.log_metric(parent_id, "trials_finished", float(df["final"].sum()) if len(df) else 0.0)
    client.log_metric(parent_id, "trials_total", float(len(df)))


def optuna_figures(study_url: str, study_name: str):
    """Optuna's parameter-importance and parallel-coordinate plots (matplotlib backend)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm

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


def run_search(s: SearchSettings) -> int:
    from regft.search_space import default_search_space_path, load_search_space
    from regft.tasks import SHAPES_REAL, resolve_task
    from regft.tracking import check_tracking_uri, resolve_tracking_uri

    # ---- 1. validate everything before any expensive work; report all problems at once
    problems: list[str] = s.validate()  # flags; then files, services, weights below
    bad_flags = bool(problems)
    task = None
    try:
        task = resolve_task(s.task, s.classnames, s.max_classes)
    except ValueError as e:
        problems.append(str(e))
    space_path = s.search_space or str(default_search_space_path(s.task or "default"))
    space = None
    try:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        space = load_search_space(space_path, known_fields=known)
    except UserError as e:
        problems += e.problems
    tracking_uri = resolve_tracking_uri(s.tracking_uri)
    problems += check_tracking_uri(tracking_uri)
    problems += [p for p in [store.check_writable(s.storage, flag="--storage")] if p]
    try:
        from regft.models import check_weights_available

        check_weights_available(s.model, s.pretrained)
    except Exception as e:  # unknown model, weights offline: one line each
        problems.append(f"--model {s.model} --pretrained {s.pretrained}: {e}")
    for flag, path in (("--real-test", s.real_test), ("--real-val", s.real_val)):
        if path and ":" not in path.split("/")[0] and not Path(path).exists():
            problems.append(f"{flag} {path}: no such file or folder")
        elif path and task is not None:
            from regft.train import real_split_problems

            problems += real_split_problems(task, path, flag[len("--real-"):])
    gen_cfg = None
    if task is not None:
        try:
            gen_cfg = _generation_config(s, task)
        except UserError as e:
            if not bad_flags:  # else they restate the flag problems already listed
                problems += e.problems
    if gen_cfg is not None:  # the generator's weights (offline: fails fast), before Ray starts
        from regft.generate import check_request

        try:
            check_request(gen_cfg)
        except UserError as e:  # the task and the storage were checked above
            problems += [p for p in e.problems if p.startswith("generator")]
    if problems:
        raise UserError(problems)

    init_ray(s.address)
    cap = cluster_capacity()
    problems = check_shared_storage(s.storage)
    if s.resource_check:
        problems += check_trial_resources(
            TrainConfig(**_train_base(s, _task_args(s, task), space.alpha.values())), cap)
    if problems:
        raise UserError(problems)
    if s.check_only:
        print(f"ok: task {task.name} ({task.num_classes} classes), search space {space_path} "
              f"({', '.join(space.parameters)}; alpha {space.alpha.values()}), cluster "
              f"{cap['cpus']:g} CPUs / {cap['gpus']:g} GPUs")
        return 0
    if s.preset == "smoke" and task.name != "shapes":
        print(f"note: --preset smoke on {task.name!r} runs the pipeline on tiny *random* models "
              "(a plumbing check: its accuracies are noise). For numbers that mean something "
              "offline, run: python -m regft.tune shapes --preset smoke")

    # ---- 2. storage layout under one root (local path or URI)
    root = store.absolute(s.storage)
    searches_root = store.join(root, "searches")
    train_root = store.join(root, "train")
    name = resolve_search_name(s, searches_root, task.name)
    experiment_path = store.join(searches_root, name)
    from ray import tune

    exists = tune.Tuner.can_restore(experiment_path)
    if s.resume and not exists:
        raise UserError(f"--resume: no search state at {experiment_path}")
    if exists and not s.resume:
        raise UserError(f"search {name!r} already exists at {experiment_path}: pass --resume to "
                        "continue it, or a new --name")
    if store.is_uri(root):
        # Optuna needs a database file; on a cluster the job's working directory is a temporary
        # copy, so keep the study in the driver's home (the head node), where --resume finds it
        study_dir = Path.home() / ".regft" / "optuna"
    else:
        study_dir = Path(root) / "optuna"
    study_dir.mkdir(parents=True, exist_ok=True)
    study_url = f"sqlite:///{study_dir / (name + '.db')}"

    # ---- 3. MLflow parent run (created first, so a crash later still leaves a record)
    from mlflow.tracking import MlflowClient

    from regft.tracking import SEARCH_TAG, find_run, flat_params, get_or_create_experiment

    client = MlflowClient(tracking_uri)
    experiment = s.experiment or f"regft-{task.name}"
    exp_id = get_or_create_experiment(client, experiment, store.join(root, "mlflow-artifacts", experiment))
    parent = find_run(client, exp_id, {SEARCH_TAG: name, "regft.role": "search"})
    if parent is None:
        parent = client.create_run(exp_id, run_name=f"search-{name}",
                                   tags={SEARCH_TAG: name, "regft.role": "search",
                                         "regft.task": task.name})
        params = {k: v for k, v in dataclasses.asdict(s).items() if k not in ("resume", "check_only")}
        params.update({"search_space_file": space_path, "num_classes": task.num_classes})
        for k, v in flat_params(params).items():
            client.log_param(parent.info.run_id, k, v)
    parent_id = parent.info.run_id
    client.update_run(parent_id, status="RUNNING")

    # ---- 4. the generated dataset (once; every trial reads the same one)
    from regft.generate import ensure_dataset

    t0 = time.time()
    dataset_path = ensure_dataset(gen_cfg)
    client.set_tag(parent_id, "regft.dataset", redact(dataset_path))
    if "dataset_id" not in client.get_run(parent_id).data.params:  # a resumed search has it
        client.log_param(parent_id, "dataset_id", Path(dataset_path).name)
    print(f"dataset: {dataset_path} (ready in {time.time() - t0:.0f} s)")

    # ---- 5. the search
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import ConcurrencyLimiter

    from regft.searcher import make_searcher
    from regft.tracking import MLflowTrialCallback

    base = _train_base(s, _task_args(s, task), space.alpha.values())
    n_conc = max_concurrent_trials(TrainConfig(**base), cap, s.num_samples,
                                   s.max_concurrent)
    static = {**{k: v for k, v in base.items() if k not in ("alpha_grid",)},
              "alpha_grid": str(space.alpha.values()), "generator": s.generator,
              "dataset_id": Path(dataset_path).name, "search": name}
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn, base=base, dataset_path=dataset_path,
                             train_storage=train_root, search_name=name),
        {"cpu": TRIAL_DRIVER_CPU},
    )
    callback = MLflowTrialCallback(tracking_uri, exp_id, parent_id, static, name)
    if s.resume:
        tuner = tune.Tuner.restore(experiment_path, trainable=trainable, param_space=space.to_tune(),
                                   resume_unfinished=True, resume_errored=True)
        print(f"resuming search {name} from {experiment_path}")
    else:
        searcher = make_searcher(SELECT, "max", s.seed, study_url, study_name=name)
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=s.epochs + 1,
                                   grace_period=1, reduction_factor=2)
                     if s.scheduler == "asha" else FIFOScheduler())
        tuner = tune.Tuner(
            trainable,
            param_space=space.to_tune(),
            tune_config=tune.TuneConfig(
                metric=SELECT, mode="max", num_samples=s.num_samples,
                search_alg=ConcurrencyLimiter(searcher, max_concurrent=n_conc),
                scheduler=scheduler, max_concurrent_trials=n_conc,
            ),
            run_config=tune.RunConfig(name=name, storage_path=searches_root, callbacks=[callback],
                                      verbose=1),
        )
    print(f"search {name}: {s.num_samples} trials, up to {n_conc} at a time, scheduler {s.scheduler}; "
          f"MLflow experiment {experiment!r} at {redact(tracking_uri)}")
    results = tuner.fit()

    # ---- 6. results, best configuration, summary
    df = _results_frame(results)
    diverged = df[df["diverged"]] if len(df) else df
    if len(diverged):  # NaN/inf loss: stopped by the trial itself, PRUNED in Optuna, tagged in MLflow
        print(f"note: {len(diverged)} trial(s) diverged (NaN/inf loss) and were stopped: "
              + ", ".join(map(str, diverged["trial_id"])))
    client.log_metric(parent_id, "trials_diverged", float(len(diverged)))
    from regft.searcher import fail_running_trials
    from regft.tracking import close_orphan_runs

    # fit() has returned, so nothing still marked running is: trials started just before a
    # driver crash and lost from Tune's saved state (a resumed search replaced them)
    orphans = close_orphan_runs(client, exp_id, parent_id, df["trial_id"] if len(df) else [])
    fail_running_trials(study_url, name)
    if orphans:
        print(f"note: {len(orphans)} trial(s) started before the driver died were not in the saved "
              f"search state and were replaced: {', '.join(map(str, orphans))} (MLflow: KILLED, "
              "regft.outcome=orphaned)")
    best = best_finished(df)
    if best is None:
        client.set_tag(parent_id, "regft.outcome", "no trial finished")
        client.set_terminated(parent_id, status="FAILED")
        print(f"error: no trial of search {name} finished; see {experiment_path}", file=sys.stderr)
        return 1
    summary = summary_table(best, name, tracking_uri, parent_id)
    _log_parent(client, parent_id, s, space, df, best, study_url, name, dataset_path, summary)
    # ---- 7. the deliverable: the best ensembled model, exported and registered (issue 8)
    from regft.registry import deliver_best

    delivered = deliver_best(
        results, best, client=client, tracking_uri=tracking_uri, parent_id=parent_id,
        search_name=name, trial_run_root=store.join(train_root, f"{name}-{best['trial_id']}"),
        export_dir=(str(Path.cwd() / ".regft" / "exports" / name) if store.is_uri(root)
                    else store.join(root, "exports", name)),
        registered_name=f"regft-{task.name}", task=task, dataset_path=dataset_path,
        evaluation={"real_test": s.real_test or (task.real_test if task.real_test == SHAPES_REAL else None),
                    "eval_batch_size": TrainConfig().eval_batch_size,
                    "device": "cuda" if s.gpus_per_trial > 0 else "cpu"})
    client.set_terminated(parent_id, status="FINISHED")
    print(summary)
    if delivered["export"]:
        where = delivered["model_uri"] or delivered["export"]
        print(f"  model: {delivered['export']}"
              + (f" (registered as {where})" if delivered["model_uri"] else "")
              + f"\n  use it: python -m regft.predict {where} IMAGE...")
    return 0


def _task_args(s: SearchSettings, task) -> dict:
    return {"task": s.task, "classnames": s.classnames, "max_classes": s.max_classes}


def _generation_config(s: SearchSettings, task):
    from regft.config import from_dict
    from regft.generate import GenerationConfig

    values = {
        "task": s.task, "classnames_file": s.classnames, "max_classes": s.max_classes,
        "generator": s.generator, "generator_options": dict(s.gen_options),
        "images_per_class": s.images_per_class, "steps": s.gen_steps, "guidance": s.guidance,
        "batch_size": s.gen_batch_size, "seed": s.seed,
        "store": store.join(store.absolute(s.storage), "datasets"),
        "use_gpu": s.gpus_per_trial > 0,
    }
    if s.gen_resolution is not None:
        values["resolution"] = s.gen_resolution
    if s.output_size is not None:
        values["output_size"] = s.output_size
    if s.gen_actors is not None:
        values["num_actors"] = s.gen_actors
    return from_dict(GenerationConfig, values, where="generation")


@entry_point
def main(argv: list[str] | None = None) -> int:
    return run_search(settings_from_argv(argv, validate=False))


if __name__ == "__main__":
    from regft.tune import main as _pkg_main  # same exception classes as entry_point catches

    raise SystemExit(_pkg_main())
