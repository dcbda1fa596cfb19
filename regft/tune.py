"""The main job: `python -m regft.tune TASK` — generate once, search with Ray Tune + Optuna,
evaluate, and log everything to MLflow.

Pipeline (regft.search.run_search): validate everything (exit 2 on any problem, before expensive
work) -> Ray -> make sure the generated dataset exists (Ray Data; every trial then reads the same
dataset) -> search (each trial one Ray Train fine-tune + alpha sweep; ASHA stops weak trials after
any epoch; Optuna TPE proposes lr / vc_weight / ...) -> best configuration's numbers per split ->
summary table + MLflow parent run with plots, CSV and the search space -> the best model, exported.

Examples:
    python -m regft.tune shapes --preset smoke          # offline quickstart (2 CPUs, minutes)
    python -m regft.tune cars --preset paper            # the paper's setting, on a GPU cluster
    python -m regft.tune cars --preset smoke            # plumbing check on tiny random models
    python -m regft.tune shapes --preset smoke --resume # finish an interrupted search

This module is the command line only: `FLAGS` maps every flag to the config field it sets (one
table for the parser, the value checks and the messages), and presets are files in
`regft/presets/` (`<preset>-<task>.yaml` where a task has its own, else `<preset>.yaml`). Values
come from flags over the preset over the dataclass defaults (regft.search.SearchSettings,
regft.train.TrainConfig, regft.generate.GenerationConfig: the one place each default lives).
"""
from __future__ import annotations

import argparse
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regft import console
from regft.cli import entry_point, shorten
from regft.config import finite_float, seed_problem
from regft.tasks import unsafe_name_problem

PRESETS_DIR = Path(__file__).resolve().parent / "presets"
POSITIVE, NON_NEGATIVE = "> 0", ">= 0"
VAE_FACTOR = 8  # the VAE downsamples by 8: generation sizes are multiples of it
# VC's variance and covariance terms are statistics over a worker's batch: two samples at least
MIN_PER_WORKER_BATCH = 2
GAP_GENERATOR = "shapes"  # the one generator with a domain gap (regft.shapes)
USAGE = "%(prog)s [TASK] [--preset NAME] [--FLAG VALUE ...]   (every flag: --help)"


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the settings field it sets (`path`: `num_samples` on the search
    settings, `train.epochs` on its TrainConfig, `generation.steps` on its GenerationConfig)."""

    name: str  # "--epochs"; "task" is the positional argument
    path: str
    type: Any = str  # argparse type; None: a switch that stores `switch_value`
    help: str | None = None
    check: str | None = None  # POSITIVE or NON_NEGATIVE, on the value (None: no value is fine)
    choices: tuple[str, ...] | None = None
    switch_value: bool = True


FLAGS = (
    Flag("task", "task", help="catalog task (cars, pets, ..., shapes) or a name for --classnames"),
    Flag("--classnames", "classnames", help="text file, one class name per line, in label order"),
    Flag("--search-space", "search_space", help="YAML file (default: the shipped search space of "
         "the task, else default.yaml; regft/search_spaces/)"),
    Flag("--num-samples", "num_samples", int, "number of trials", POSITIVE),
    Flag("--max-concurrent", "max_concurrent", int, check=POSITIVE),
    Flag("--scheduler", "scheduler", choices=("asha", "fifo")),
    Flag("--sampler", "sampler", choices=("tpe", "random"),  # searcher.SAMPLERS
         help="how trials are proposed: tpe (Optuna TPE, default) or random (random search)"),
    Flag("--workers-per-trial", "train.num_workers", int, check=POSITIVE),
    Flag("--gpus-per-trial", "gpus_per_trial", float, check=NON_NEGATIVE),
    Flag("--cpus-per-worker", "train.cpus_per_worker", float, check=POSITIVE),
    Flag("--ingest", "train.ingest", choices=("ray_data", "worker"),  # train.INGESTS
         help="where the train split is decoded: ray_data (a Ray Data map) or worker (each "
         "worker's own DataLoader processes, --loader-workers)"),
    Flag("--loader-workers", "train.loader_workers", int, "with --ingest worker: decode "
         "processes per worker (0: in the worker)", NON_NEGATIVE),
    Flag("--model", "train.model"),
    Flag("--pretrained", "train.pretrained"),
    Flag("--epochs", "train.epochs", int, check=POSITIVE),
    Flag("--batch-size", "train.batch_size", int, check=POSITIVE),
    Flag("--warmup-steps", "train.warmup_steps", int, check=NON_NEGATIVE),
    Flag("--selection-metric", "train.selection_metric"),
    Flag("--alpha-rule", "train.alpha_rule", help="knee (default), 1se or argmax, on the selection split"),
    Flag("--real-test", "train.real_test", help="real test split (only reported)"),
    Flag("--real-val", "train.real_val", help="labelled real validation split (may select)"),
    Flag("--val-fraction", "train.val_fraction", float, "generated images held out for "
         "synthetic_val (sha256 rule; a few images per class may need more than 0.1)", POSITIVE),
    Flag("--max-classes", "max_classes", int, check=POSITIVE),
    Flag("--generator", "generation.generator"),
    Flag("--gap", "generation.generator_options.gap", float, "shapes generator: domain gap in [0, 1]"),
    Flag("--collapse", "generation.generator_options.collapse", float, "shapes generator: "
         "diversity collapse in [0, 1] (1: a few poses / backgrounds per class)"),
    Flag("--images-per-class", "generation.images_per_class", int, check=POSITIVE),
    Flag("--resolution", "generation.resolution", int),
    Flag("--steps", "generation.steps", int, check=POSITIVE),
    Flag("--guidance", "generation.guidance", float, check=NON_NEGATIVE),
    Flag("--gen-scheduler", "generation.scheduler", help="generation scheduler: default (the "
         "model's own) or a diffusers scheduler class, e.g. DPMSolverMultistepScheduler"),
    Flag("--gen-batch-size", "generation.batch_size", int, check=POSITIVE),
    Flag("--gen-actors", "generation.num_actors", int, check=POSITIVE),
    Flag("--gen-dtype", "generation.dtype", choices=("auto", "fp16", "bf16", "fp32"),  # generators.DTYPES
         help="generation precision: auto (default) = fp16 on GPU, fp32 on CPU; bf16 halves the "
         "memory of a CPU run (fast where the CPU has AMX)"),
    Flag("--weights", "weights", choices=("auto", "pretrained", "random"),  # realsize.WEIGHTS_CHOICES
         help="auto (default) / pretrained: the real weights, else stop; random: the real "
         "architectures with seeded random weights (offline sizing runs; outputs say so)"),
    Flag("--seed", "seed", int),
    Flag("--storage", "storage", help="local path or URI (s3://...) for datasets and search state"),
    Flag("--tracking-uri", "tracking_uri", help="MLflow tracking URI (default: ./mlflow.db)"),
    Flag("--experiment", "experiment"),
    Flag("--name", "name", help="search name (default <task>-<preset>-<time>)"),
    Flag("--resume", "resume", None, "continue the search --name (or the latest one of this task)"),
    Flag("--address", "address", help="Ray cluster address (default RAY_ADDRESS or local)"),
    Flag("--check-only", "check_only", None, "validate and exit"),
    Flag("--verbose", "verbose", None, "show Ray's own output (workers' logs, Tune's per-trial "
         "tables); the full log is written either way"),
    Flag("--audit-log", "train.audit_log",
         help="append when each trial opened each eval split (JSON lines) to this file"),
    Flag("--no-resource-check", "resource_check", None,
         "skip the cluster-capacity check (autoscaling clusters)", switch_value=False),
)
FLAG_OF = {f.path: f.name for f in FLAGS}


# ----------------------------------------------------------------------------- presets --

def preset_names() -> list[str]:
    """The shipped presets; `<preset>-<task>.yaml` is that preset's variant for one task."""
    stems = {p.stem for p in PRESETS_DIR.glob("*.yaml")}
    return sorted(s for s in stems if not any(s.startswith(f"{o}-") for o in stems if o != s))


def preset_file(name: str, task: str | None) -> Path:
    # the variant is looked up by name among the shipped files, never opened from a path built
    # of user input (a task name is not a path)
    variant = f"{name}-{task}"
    shipped = {p.stem for p in PRESETS_DIR.glob("*.yaml")}
    return PRESETS_DIR / f"{variant if variant in shipped else name}.yaml"


# -------------------------------------------------------------------------------- flags --

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m regft.tune", usage=USAGE,  # an error prints the usage: keep it one line
        description="Search VC weight, learning rate and ensemble alpha for name-only transfer of CLIP.",
        epilog="Flags override the preset's values, which override the paper's defaults.",
    )
    unset = argparse.SUPPRESS  # unset flags stay unset, so presets can fill them
    p.add_argument("--preset", choices=preset_names(), default=unset)
    for f in FLAGS:
        if f.name == "task":
            p.add_argument("task", nargs="?", default=unset, help=f.help)
        elif f.type is None:
            p.add_argument(f.name, dest=f.path, default=unset, help=f.help,
                           action="store_true" if f.switch_value else "store_false")
        else:
            # every float flag goes through the one number check (NaN, infinity refused)
            kind = finite_float if f.type is float else f.type
            p.add_argument(f.name, dest=f.path, type=kind, default=unset, help=f.help,
                           choices=f.choices, metavar=f.name[2:].upper().replace("-", "_"))
    return p


def parse_flags(argv: list[str] | None) -> tuple[dict[str, Any], Path | None]:
    """The flags given, as {settings path: value}, and the preset file they select."""
    values = vars(build_parser().parse_args(argv))
    preset = values.get("preset")  # absent unless given: flags left out stay out
    return values, preset_file(preset, values.get("task")) if preset else None


def flag_problems(settings) -> list[str]:
    """Every bad value among the search settings' flag-set fields, each naming its flag (the
    value may come from the preset: the flag is how to change it), then what the training and
    generation configs of the search say about their own fields, named the same way. All of it
    before Ray starts."""
    value = {f.path: operator.attrgetter(f.path)(settings) for f in FLAGS
             if not f.path.startswith("generation.generator_options")}
    p = []
    for f in FLAGS:
        v = value.get(f.path)
        if v is None:
            continue
        if isinstance(v, str) and f.type is str and not v.strip():
            p.append(f"{f.name}: empty value; give one or leave the flag out")
        elif (f.check == POSITIVE and v <= 0) or (f.check == NON_NEGATIVE and v < 0):
            p.append(f"{f.name}: must be {f.check}, got {v}")
        elif f.choices and v not in f.choices:
            p.append(f"{f.name}: {shorten(v)} is not one of {', '.join(f.choices)}")
    if settings.max_classes is not None and settings.max_classes == 1:
        p.append(f"--max-classes: a classifier needs at least 2 classes, got {settings.max_classes}")
    resolution = settings.generation.resolution
    if resolution is not None and (resolution <= 0 or resolution % VAE_FACTOR):
        p.append(f"--resolution: must be a positive multiple of {VAE_FACTOR} (the VAE downsamples "
                 f"by {VAE_FACTOR}), got {resolution}")
    for flag, name in (("--name", settings.name), ("--experiment", settings.experiment)):
        problem = unsafe_name_problem(name, flag) if name is not None else None
        if problem and name.strip():  # they name folders (an empty one is reported above)
            p.append(problem)
    p += [x for x in (seed_problem(settings.seed, "--seed"),) if x]
    p += _batch_problems(settings) + _gap_problems(settings)
    return p + [x for x in _config_problems(settings) if not _reported(x, p)]


def _batch_problems(settings) -> list[str]:
    """The global batch is split evenly over a trial's workers, and VC (sampled by the search)
    needs at least MIN_PER_WORKER_BATCH images on each."""
    batch, workers = settings.train.batch_size, settings.train.num_workers
    if batch <= 0 or workers <= 0:
        return []  # reported by the flag table
    if batch % workers:
        return [f"--batch-size {batch} does not split evenly over --workers-per-trial {workers}; "
                f"e.g. --batch-size {max(workers * MIN_PER_WORKER_BATCH, batch // workers * workers)}"]
    if batch // workers < MIN_PER_WORKER_BATCH:
        return [f"--batch-size {batch} over --workers-per-trial {workers} is {batch // workers} "
                f"image(s) per worker; VC needs at least {MIN_PER_WORKER_BATCH} (e.g. --batch-size "
                f"{workers * MIN_PER_WORKER_BATCH})"]
    return []


def _gap_problems(settings) -> list[str]:
    """--gap and --collapse (flags or preset keys): options of the shapes generator, in [0, 1]."""
    generation, p = settings.generation, []
    for key, what, meaning in (("gap", "a domain gap", "0 = the real domain, 1 = the full shift"),
                               ("collapse", "a diversity collapse",
                                "0 = as diverse as the real domain, 1 = a few modes per class")):
        if key not in generation.generator_options:
            continue
        v = generation.generator_options[key]
        if generation.generator != GAP_GENERATOR:
            p.append(f"--{key}: only --generator {GAP_GENERATOR} has {what}; drop --{key} for "
                     f"--generator {shorten(generation.generator)}")
        elif not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v <= 1.0:
            p.append(f"--{key}: must be in [0, 1] ({meaning}), got {shorten(v)}")
    return p


def _label(section: str):
    """A config field of `section` named as this command sets it: its flag, else its preset key."""
    def label(field_name: str) -> str:
        return FLAG_OF.get(f"{section}.{field_name}") or f"{section}.{field_name} (preset key)"
    return label


def _config_problems(settings) -> list[str]:
    """TrainConfig.validate and GenerationConfig.validate on what the search will run, with this
    command's names (the task, the storage and the alpha grid are checked elsewhere)."""
    from regft.generate import generator_setting_problems  # loaded by main() already
    from regft.search import generation_config, trial_config

    problems = []
    if settings.train.num_workers > 0:  # else reported by the flag table (and GPUs / 0 workers)
        trial = trial_config(settings, alpha_grid=[0.0, 1.0])  # the space's grid: checked with it
        problems += trial.validate(_label("train"))
    generation = generation_config(settings)
    generation_problems = generation.validate(_label("generation"))
    if not [p for p in generation_problems if not p.startswith("task")]:
        # what the model's pipeline cannot take (a scheduler, guidance, a size), named by flag
        generation_problems += generator_setting_problems(generation, _label("generation"))
    return [p for p in problems + generation_problems if not p.startswith("task")]


def _reported(problem: str, reported: list[str]) -> bool:
    """Whether `problem` is about a flag the flag table already reported (one message each)."""
    flags = {r.split(":")[0].split(" ")[0] for r in reported}
    return problem.split(":")[0].split(" ")[0] in flags


@entry_point
def main(argv: list[str] | None = None) -> int:
    values, preset = parse_flags(argv)
    # everything from here on also goes to search.log (moved next to the search's state once
    # that is known); the terminal gets what a person needs (regft.console). The session opens
    # before the heavy imports, so loggers they create (Optuna's, Ray's) write through it.
    # --verbose is a store_true flag that is absent unless given (parse_flags).
    with console.session(verbose="verbose" in values):
        # the search imports torch, Ray Tune and MLflow (seconds): only once the flags parsed,
        # so --help and a bad flag answer at once
        from regft import search

        settings = search.settings_from(values, preset)
        return search.run_search(settings, flag_problems(settings))


if __name__ == "__main__":
    raise SystemExit(main())
