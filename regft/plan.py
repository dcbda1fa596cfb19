"""`python -m regft.plan TASK [--preset P] [any regft.tune flag] [--gpus N] [--gpu-memory-gb G]
[--json PATH]`: what the search would cost, measured before anything is rented (entry ring).

Every stage of the real job runs on a small sample at full dimensions on this machine's device
(CUDA when present, else CPU) and is extrapolated with the job's real counts:

- generation: one pipeline call at the configured resolution with two denoising steps; the
  UNet's calls are timed one by one, so the fit time = fixed + per-step x steps comes from the
  two step counts of that one call (1 step: the call minus its last UNet call; 2 steps: all of
  it), the later (warm) step being the per-step cost. Resize, PNG encoding and one shard written
  are in the fixed part. On CPU one image per call (scaled linearly to the job's batch);
- head: the task's head texts, a sample encoded, extrapolated to all of them (once per trial);
- training: steps of the real model with VC, at the per-worker batch (on CPU a small batch,
  stated, scaled linearly), AMP as the target device would run it;
- evaluation: one batch; per trial: each epoch's validation, the alpha sweep (grid size x the
  selection split, and the reported splits when curves are reported) and the three reported
  models (zero-shot, fine-tuned, ensemble);
- checkpoint: one written (weights + AdamW state), bytes and seconds; storage = dataset shards +
  checkpoints kept x trials + the export.

Weights: `--weights auto` (default) uses the real weights when they are here and otherwise
falls back to random ones *and says so* (their times and sizes are the real job's); `random`
never looks; `pretrained` insists. regft.tune never falls back (issue 18).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from regft import console
from regft.cli import entry_point
from regft.config import finite_float
from regft.errors import UserError

# plan-only flags on top of regft.tune's
PLAN_FLAGS = ("--gpus", "--gpu-memory-gb", "--json")
# tune flags that change how a search runs, not what it costs: the plan cannot price them
UNPRICED = {
    "resume": "--resume: a plan prices a whole search; a resumed one costs what is left of it",
    "address": "--address: the plan measures this machine; give the cluster as --gpus N",
    "check_only": "--check-only: regft.plan is itself a check; leave the flag out",
    "train.real_test": "--real-test: the plan cannot price a real split yet (its size); leave it out",
    "train.real_val": "--real-val: the plan cannot price a real split yet (its size); leave it out",
}
MAX_GPU_MEMORY_GB = 1024  # no single accelerator has more: a larger --gpu-memory-gb is a typo
CPU_GEN_BATCH = 1  # images per pipeline call measured on CPU (a 512 px image takes minutes there)
CPU_TRAIN_BATCH = 4  # per-worker batch measured on CPU (VC needs >= 2; larger costs minutes)
CPU_EVAL_BATCH = 8
HEAD_SAMPLE_TEXTS = 32  # head texts encoded to time the text tower
GEN_STEPS_MEASURED = 2  # the two step counts of the fit: 1 and 2
TRAIN_STEPS_MEASURED = 2  # the first warms up, the last is timed
VC_MIN_WEIGHT = 1e-6  # VC's gradient is paid even where the searched weight starts at 0
MEMORY_POLL_S = 0.05
RANDOM_BANNER = ("WEIGHTS: RANDOM -- {why}. Real architectures, seeded random weights: the times, "
                 "memory and bytes below are those of the real job; nothing else is.")
GB = 1e9
DAY_S = 86400
BUSY_SHARE = 0.5  # below this share of its threads' CPU time, the machine was busy: say so


# ----------------------------------------------------------------------- memory ----

def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far (never decreases) is the best there is
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory while the block runs: torch.cuda.max_memory_allocated on GPU, sampled RSS on CPU."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0
        self._stop = threading.Event()

    def _poll(self):
        while not self._stop.wait(MEMORY_POLL_S):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        import torch

        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        self._stop.set()
        self._thread.join()
        if self.device == "cuda":
            self.peak = int(torch.cuda.max_memory_allocated())
        else:
            self.peak = max(self.peak, _rss_bytes())
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ----------------------------------------------------------------------- stages ----

@dataclass
class Stage:
    name: str
    unit: str
    seconds_per_unit: float
    units: int
    peak_memory_bytes: int
    projected_seconds: float = 0.0
    note: str = ""

    def __post_init__(self):
        self.projected_seconds = self.seconds_per_unit * self.units

    def row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "note"}


@dataclass
class Plan:
    weights: str
    device: str
    parameters: dict[str, int]
    stages: list[Stage]
    storage_bytes: dict[str, int]
    projected_search_hours: float
    projected_generation_device_hours: float
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    search: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"weights": self.weights, "device": self.device, "parameters": self.parameters,
                "stages": [s.row() for s in self.stages], "storage_bytes": self.storage_bytes,
                "projected_search_hours": self.projected_search_hours,
                "projected_generation_device_hours": self.projected_generation_device_hours,
                "warnings": self.warnings}


# ------------------------------------------------------------------ the command line ----

def build_parser() -> argparse.ArgumentParser:
    from regft.tune import build_parser as tune_parser

    p = tune_parser()
    p.prog = "python -m regft.plan"
    p.usage = ("%(prog)s TASK [--preset NAME] [any regft.tune flag] [--gpus N] [--gpu-memory-gb G] "
               "[--json PATH]")
    p.description = "Measure every stage of the search on a small sample at full size; project its cost."
    p.add_argument("--gpus", type=int, default=None, help="GPUs of the cluster to price (default: "
                   "this machine's; on a CPU-only machine its CPU stands for one device)")
    p.add_argument("--gpu-memory-gb", type=finite_float, default=None,
                   help="memory of one GPU: warn when a training batch will not fit")
    p.add_argument("--json", default=None, help="also write the plan as JSON to this file")
    return p


@dataclass(frozen=True)
class Request:
    settings: object  # regft.search.SearchSettings
    task: object  # regft.tasks.Task
    trial: object  # the TrainConfig every trial starts from
    generation: object  # its GenerationConfig
    gpus: int | None
    gpu_memory_gb: float | None
    json_path: str | None


def parse_request(argv: list[str] | None) -> Request:
    """Flags, preset and task checked, every problem at once (UserError), before any model."""
    from regft import search
    from regft.search_space import default_search_space_path, load_search_space
    from regft.tasks import resolve_task
    from regft.tune import flag_problems, preset_file

    args = vars(build_parser().parse_args(argv))
    gpus, memory, json_path = args.pop("gpus"), args.pop("gpu_memory_gb"), args.pop("json")
    problems = [msg for key, msg in UNPRICED.items() if key in args]
    if "task" not in args:
        problems.append("TASK: give a catalog task (cars, pets, ..., shapes) or --classnames FILE")
    if gpus is not None and gpus < 0:
        problems.append(f"--gpus: must be >= 0, got {gpus}")
    if memory is not None and not (0 < memory <= MAX_GPU_MEMORY_GB):
        problems.append(f"--gpu-memory-gb: must be in (0, {MAX_GPU_MEMORY_GB}], got {memory}")
    if problems:
        raise UserError(problems)
    preset = args.get("preset")
    settings = search.settings_from(args, preset_file(preset, args.get("task")) if preset else None)
    problems = flag_problems(settings)
    task = None
    try:
        task = resolve_task(settings.task, settings.classnames, settings.max_classes)
    except ValueError as e:
        problems.append(str(e))
    if settings.gpus_per_trial > 0 and gpus is not None:
        if gpus == 0:
            problems.append(f"--gpus 0: the search trains on {settings.gpus_per_trial:g} GPU(s) per "
                            "trial; pass --gpus-per-trial 0 to price a CPU cluster")
        elif gpus < settings.gpus_per_trial:
            problems.append(f"--gpus {gpus}: one trial needs {settings.gpus_per_trial:g} GPUs "
                            "(--gpus-per-trial): it could never start")
    if memory is not None and settings.gpus_per_trial == 0:
        problems.append("--gpu-memory-gb: the search trains on CPUs (--gpus-per-trial 0)")
    if problems:
        raise UserError(problems)
    space = load_search_space(settings.search_space or str(default_search_space_path(settings.task)))
    return Request(settings, task, search.trial_config(settings, space.alpha.values()),
                   search.generation_config(settings), gpus, memory, json_path)


# ------------------------------------------------------------------------ weights ----

def resolve_weights(req: Request) -> tuple[Request, str, str | None]:
    """(request with the weights it will use, 'random' | 'pretrained', why random or None).
    auto: the real weights when they are here, else random, said loudly; pretrained: or stop."""
    import dataclasses

    from regft import realsize
    from regft.generators import BUILTIN_GENERATORS, TINY_VARIANTS, locate_diffusers_model
    from regft.models import TINY_ALIASES, check_weights_available

    s, trial, gen = req.settings, req.trial, req.generation
    missing = []  # (what, why), one each for the CLIP and the generator
    if s.weights != realsize.RANDOM:
        try:
            check_weights_available(trial.model, trial.pretrained)
        except (RuntimeError, ValueError) as e:
            missing.append((f"{trial.model}/{trial.pretrained}", str(e)))
        if gen.generator not in BUILTIN_GENERATORS and not os.path.isdir(gen.generator):
            try:
                locate_diffusers_model(gen.generator, gen.generator_options.get("revision"))
            except (RuntimeError, ValueError) as e:
                missing.append((gen.generator, str(e)))
    names = " and ".join(w for w, _ in missing)
    if missing and s.weights == realsize.PRETRAINED:
        raise UserError(f"--weights pretrained: no real weights here for {names} (offline, not "
                        "cached): copy the Hugging Face cache here, or price it with --weights random")
    why = None
    if s.weights == realsize.RANDOM:
        why = "--weights random"
    elif missing:
        why = f"--weights auto found no real weights here for {names} (offline, not cached)"
    if why is not None:
        options = dict(gen.generator_options)
        if gen.generator not in BUILTIN_GENERATORS:
            options["weights"] = realsize.RANDOM
        req = dataclasses.replace(req, trial=dataclasses.replace(trial, pretrained=None),
                                  generation=dataclasses.replace(gen, generator_options=options))
    tiny = req.trial.model in TINY_ALIASES or req.generation.generator in TINY_VARIANTS
    label = realsize.RANDOM if why is not None or tiny or not req.trial.pretrained else realsize.PRETRAINED
    if why is None and label == realsize.RANDOM:
        why = "the model or generator is a tiny random one (no weights exist)"
    return req, label, why


# ---------------------------------------------------------------------- measuring ----

def device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def timed(fn: Callable, device: str) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t0, out


def _time_calls(module, device: str, times: list[float]) -> list:
    """Hooks that append each forward call's seconds to `times` (hooks return None: a value
    would replace the call's input or output)."""
    start: list[float] = []

    def before(*_):
        _sync(device)
        start.append(time.perf_counter())

    def after(*_):
        _sync(device)
        times.append(time.perf_counter() - start[-1])

    return [module.register_forward_pre_hook(before), module.register_forward_hook(after)]


@dataclass
class GenMeasure:
    load_s: float
    seconds_per_image: float  # at the job's step count
    fixed_s: float
    per_step_s: float
    shard_bytes_per_image: float
    peak: int
    parameters: dict[str, int]
    batch: int


def measure_generation(req: Request, device: str, tmp: Path) -> GenMeasure:
    """One call at two steps, the UNet's calls timed; resize, encode and one shard written."""
    from regft import store as st
    from regft.generate import generate_shard
    from regft.generators import make_generator
    from regft.realsize import count

    cfg = req.generation
    batch = cfg.batch_size if device == "cuda" else CPU_GEN_BATCH
    items = (dataset_items(req) * batch)[:batch]  # the job's first prompts
    with PeakMemory(device) as mem:
        gen = make_generator(cfg.generator, resolution=cfg.effective_resolution(),
                             steps=GEN_STEPS_MEASURED, guidance=cfg.guidance, device=device,
                             dtype=cfg.dtype, scheduler=cfg.scheduler, options=cfg.generator_options)
        load = getattr(gen, "load", None)
        load_s, pipe = timed(load, device) if callable(load) else (0.0, None)
        unet_times: list[float] = []
        hooks = []
        if pipe is not None:
            hooks = _time_calls(pipe.unet, device, unet_times)
        t0 = time.perf_counter()
        table = generate_shard(gen, items, batch, cfg.effective_output_size(), None)
        rec = st.write_shard(str(tmp / "dataset"), 0, table)
        total = time.perf_counter() - t0
        for h in hooks:
            h.remove()
    shard_bytes = sum(f.stat().st_size for f in (tmp / "dataset").rglob("*") if f.is_file())
    params = {"unet": 0, "vae": 0, "text_encoder": 0}
    if pipe is not None:
        params = {k: count(getattr(pipe, k)) for k in params}
    warmup = 0.0
    if len(unet_times) >= GEN_STEPS_MEASURED:
        per_step = unet_times[-1] / batch  # the warm step
        fixed = (total - sum(unet_times)) / batch
        # the first call's extra time (kernels picked, buffers allocated) is paid once per actor
        warmup = max(0.0, unet_times[0] - unet_times[-1])
    else:  # no UNet (the shapes generator): all of it is per image
        per_step, fixed = 0.0, total / batch
    del gen, pipe, table, rec
    gc.collect()
    return GenMeasure(load_s + warmup, fixed + per_step * cfg.steps, fixed, per_step, shard_bytes / batch,
                      mem.peak, params, batch)


@dataclass
class ClipMeasure:
    load_s: float
    load_peak: int
    head_s_per_text: float
    head_peak: int
    train_s_per_image: float
    train_batch: int
    train_peak: int
    activation_bytes_per_image: float
    autocast: object  # the torch dtype training autocasts to, None: fp32
    eval_s_per_image: float
    eval_peak: int
    checkpoint_s: float
    model_bytes: int
    optimizer_bytes: int
    checkpoint_peak: int
    parameters: dict[str, int]
    export_bytes: int


def measure_clip(req: Request, device: str, tmp: Path) -> ClipMeasure:
    """The real CLIP built, head texts encoded, training steps with VC, one eval batch and one
    checkpoint written."""
    import torch

    from regft.models import create_clip, encode_texts, logit_scale_of
    from regft.realsize import count
    from regft.zeroshot import ClassificationHead, ImageClassifier

    cfg, task = req.trial, req.task
    with PeakMemory(device) as mem:
        load_s, bundle = timed(lambda: create_clip(cfg.model, cfg.pretrained, seed=cfg.seed,
                                                   device=device), device)
    load_peak = mem.peak
    texts = [t for ts in task.zeroshot_texts() for t in ts][:HEAD_SAMPLE_TEXTS]
    with PeakMemory(device) as mem:
        encode_texts(bundle.model, bundle.tokenizer, [texts[:1]], device=device)  # warm-up
        head_s, _ = timed(lambda: encode_texts(bundle.model, bundle.tokenizer, [texts], device=device),
                          device)
    head_peak = mem.peak
    params = {"clip_visual": count(bundle.model.visual), "clip_total": count(bundle.model)}
    weight = torch.randn(task.num_classes, bundle.embed_dim) * logit_scale_of(bundle.model)
    # the classifier keeps the image tower only, as the workers' does
    model = ImageClassifier(bundle.model, ClassificationHead(weight)).to(device)
    size, bundle = bundle.image_size, None
    gc.collect()
    train = _measure_training(req, model, size, device)
    evaluation = _measure_eval(req, model, size, device)
    ckpt = _measure_checkpoint(model, train.pop("optimizer"), device, tmp)
    return ClipMeasure(load_s=load_s, load_peak=load_peak, head_s_per_text=head_s / len(texts),
                       head_peak=head_peak, parameters=params, **train, **evaluation, **ckpt)


def _measure_training(req: Request, model, size: int, device: str) -> dict:
    import torch

    from regft import engine
    from regft.loop import precision_for

    cfg, task = req.trial, req.task
    per_worker = cfg.batch_size // max(1, cfg.num_workers)
    batch = per_worker if device == "cuda" else min(per_worker, CPU_TRAIN_BATCH)
    precision = precision_for(cfg.precision, torch.device(device))
    optimizer = engine.build_optimizer(model, cfg.lr, cfg.weight_decay)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, task.num_classes, (batch,), device=device)
    before = _rss_bytes()
    with PeakMemory(device) as mem:
        step_s = 0.0
        for _ in range(TRAIN_STEPS_MEASURED):  # the last one is timed: the first warms up
            step_s, _ = timed(lambda: engine.train_step(
                model, (images, labels), optimizer, vc_weight=max(cfg.vc_weight, VC_MIN_WEIGHT),
                vc_cov_ratio=cfg.vc_cov_ratio, grad_clip=cfg.grad_clip,
                autocast_dtype=precision.autocast_dtype, scaler=precision.scaler), device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the step's memory beyond the weights (RSS) or in all (CUDA): gradients + two AdamW
    # moments (3x the weights) + the activations, which are what scales with the batch
    grown = mem.peak - before if device != "cuda" else mem.peak - param_bytes
    return {"train_s_per_image": step_s / batch, "train_batch": batch, "train_peak": mem.peak,
            "activation_bytes_per_image": max(0.0, (grown - 3 * param_bytes) / batch),
            "optimizer": optimizer, "autocast": precision.autocast_dtype}


def _measure_eval(req: Request, model, size: int, device: str) -> dict:
    import torch

    from regft import engine
    from regft.loop import precision_for

    cfg = req.trial
    batch = cfg.eval_batch_size if device == "cuda" else min(cfg.eval_batch_size, CPU_EVAL_BATCH)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    autocast = precision_for(cfg.precision, torch.device(device)).autocast_dtype
    with PeakMemory(device) as mem:
        for _ in range(2):  # warm-up, then timed
            eval_s, _ = timed(lambda: engine.evaluate(model, [(images, labels)], autocast_dtype=autocast,
                                                      keep_features=True), device)
    return {"eval_s_per_image": eval_s / batch, "eval_peak": mem.peak}


def _measure_checkpoint(model, optimizer, device: str, tmp: Path) -> dict:
    """An epoch checkpoint as regft.checkpoint writes it: the weights, then the optimizer state."""
    import torch

    folder = tmp / "checkpoint"
    folder.mkdir()
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, folder / "model.pt")
        torch.save({"optimizer": optimizer.state_dict()}, folder / "train_state.pt")
        seconds = time.perf_counter() - t0
    model_bytes = (folder / "model.pt").stat().st_size
    return {"checkpoint_s": seconds, "model_bytes": model_bytes,
            "optimizer_bytes": (folder / "train_state.pt").stat().st_size,
            "checkpoint_peak": mem.peak, "export_bytes": model_bytes}


# --------------------------------------------------------------------- projecting ----

@dataclass(frozen=True)
class Counts:
    """The job's real counts."""

    images: int
    train_images: int
    val_images: int
    head_texts: int
    trials: int
    epochs: int
    steps_per_epoch: int
    alphas: int
    concurrent: int
    generation_actors: int
    devices: int


def dataset_items(req: Request) -> list:
    """The dataset's items as regft.generate makes them (ids from the whole task's name)."""
    from regft.generate import request_items, request_task

    return request_items(req.generation, request_task(req.generation))


def job_counts(req: Request) -> Counts:
    from regft.resources import max_concurrent_trials, trial_cpus
    from regft.store import split_of
    from regft.train import steps_per_epoch

    s, cfg, gen, task = req.settings, req.trial, req.generation, req.task
    items = dataset_items(req)
    images = len(items)
    val = sum(split_of(it.item_id, cfg.val_fraction) == "val" for it in items)  # the store's rule
    train = images - val
    local_gpus = _local_gpus()
    devices = req.gpus if req.gpus is not None else max(1, local_gpus)
    capacity = {"cpus": trial_cpus(cfg) * s.num_samples, "gpus": float(devices)}
    concurrent = max_concurrent_trials(cfg, capacity, s.num_samples, s.max_concurrent)
    if not cfg.use_gpu and req.gpus is None:  # a CPU search here: this machine's CPUs
        concurrent = max_concurrent_trials(cfg, {"cpus": float(os.cpu_count() or 1), "gpus": 0.0},
                                           s.num_samples, s.max_concurrent)
    actors = gen.num_actors or (devices if cfg.use_gpu or local_gpus else 1)
    return Counts(images=images, train_images=train, val_images=val,
                  head_texts=sum(len(t) for t in task.zeroshot_texts()), trials=s.num_samples,
                  epochs=cfg.epochs, steps_per_epoch=steps_per_epoch(train, cfg),
                  alphas=len(cfg.alpha_grid), concurrent=concurrent, generation_actors=actors,
                  devices=devices)


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def eval_images_per_trial(req: Request, c: Counts) -> int:
    """Per epoch the selection split; then the alpha sweep on it (and on the reported splits when
    curves are reported); then zero-shot, fine-tuned and ensemble on every split."""
    splits = 1  # synthetic_val (real splits are not priced: parse_request refuses them)
    sweeps = c.alphas * (splits if req.trial.report_alpha_curves else 1)
    return c.val_images * (c.epochs + sweeps + 3 * splits)


def project(req: Request, label: str, device: str, g: GenMeasure, m: ClipMeasure) -> Plan:
    from regft.checkpoint import Policy, finished_bytes_per_trial, kept_bytes_per_trial

    c, cfg = job_counts(req), req.trial
    workers = max(1, cfg.num_workers)
    per_worker = cfg.batch_size // workers
    step_s = m.train_s_per_image * per_worker  # one step of every worker, in parallel
    train_units = c.trials * c.epochs * c.steps_per_epoch * per_worker * workers
    stages = [
        Stage("clip.load", "model built (per trial)", m.load_s, c.trials, m.load_peak),
        Stage("generation.load", "load + first call (per actor)", g.load_s, c.generation_actors, g.peak),
        Stage("generation", "image", g.seconds_per_image, c.images, g.peak,
              note=f"fixed {g.fixed_s:.2f} s + {g.per_step_s:.2f} s/step x {req.generation.steps} steps "
                   f"per image, measured at batch {g.batch}"),
        Stage("head", "text encoded", m.head_s_per_text, c.head_texts * c.trials, m.head_peak,
              note=f"{c.head_texts} texts per trial's head"),
        Stage("training", "image (forward+backward, VC)", m.train_s_per_image, train_units, m.train_peak,
              note=f"measured at batch {m.train_batch}, precision {_precision(m.autocast)}; the "
                   f"job's per-worker batch {per_worker}"),
        Stage("evaluation", "image (forward)", m.eval_s_per_image,
              eval_images_per_trial(req, c) * c.trials, m.eval_peak),
        Stage("checkpoint", "checkpoint written", m.checkpoint_s, (c.epochs + 1) * c.trials,
              m.checkpoint_peak,
              note=f"{(m.model_bytes + m.optimizer_bytes) / GB:.2f} GB each"),
    ]
    by = {s.name: s for s in stages}
    train_wall = c.trials * c.epochs * c.steps_per_epoch * step_s  # the workers step in parallel
    trial_wall = (by["clip.load"].projected_seconds + by["head"].projected_seconds + train_wall
                  + by["evaluation"].projected_seconds / workers
                  + by["checkpoint"].projected_seconds) / c.trials
    gen_device_s = by["generation"].projected_seconds + by["generation.load"].projected_seconds
    gen_wall = g.load_s + by["generation"].projected_seconds / c.generation_actors
    rounds = math.ceil(c.trials / c.concurrent)
    search_wall = gen_wall + rounds * trial_wall
    per_trial_devices = cfg.num_workers * cfg.gpus_per_worker if cfg.use_gpu else 1.0
    device_hours = (gen_device_s + c.trials * trial_wall * per_trial_devices) / 3600
    policy = Policy(keep_best=cfg.keep_checkpoints)
    # the most at any moment: the last round's trials running (their checkpoints with optimizer
    # state, regft.checkpoint's policy), every trial before them finished (weights only)
    running = min(c.concurrent, c.trials)
    checkpoints = (running * kept_bytes_per_trial(m.model_bytes, m.optimizer_bytes, policy)
                   + (c.trials - running) * finished_bytes_per_trial(m.model_bytes, policy))
    storage = {"dataset": int(g.shard_bytes_per_image * c.images), "checkpoints": int(checkpoints),
               "export": int(m.export_bytes)}
    storage["total"] = sum(storage.values())
    plan = Plan(label, device, {**g.parameters, **m.parameters}, stages, storage,
                search_wall / 3600, gen_device_s / 3600,
                search={"trials": c.trials, "concurrent": c.concurrent, "rounds": rounds,
                        "trial_hours": trial_wall / 3600, "generation_hours": gen_wall / 3600,
                        "device_hours": device_hours, "devices": c.devices,
                        "generation_actors": c.generation_actors})
    plan.warnings += (count_warnings(req, c) + memory_warnings(req, m, per_worker)
                      + storage_warnings(req, storage))
    if device == "cpu":
        plan.notes.append("measured on this machine's CPU: a GPU's figures come from running "
                          "regft.plan there (benchmarks/gpu.sh); times scale linearly from the "
                          "measured batches")
    plan.notes.append(f"ASHA may stop trials early: {c.trials} trials x {c.epochs} epochs is an upper bound")
    return plan


def _precision(autocast) -> str:
    return "fp32" if autocast is None else f"{str(autocast).removeprefix('torch.')} autocast"


def count_warnings(req: Request, c: Counts) -> list[str]:
    """What would stop the job itself: an empty split, an epoch without a step."""
    w = []
    if c.val_images == 0:
        w.append(f"--images-per-class {req.generation.images_per_class}: the synthetic_val split "
                 f"(val_fraction {req.trial.val_fraction:g} of {c.images} images) is empty; alpha "
                 "cannot be selected: generate more images")
    if c.steps_per_epoch == 0:
        w.append(f"--batch-size {req.trial.batch_size}: larger than the train split ({c.train_images} "
                 "images): an epoch would have no step")
    return w


def memory_warnings(req: Request, m: ClipMeasure, per_worker: int) -> list[str]:
    if req.gpu_memory_gb is None:
        return []
    params = m.parameters["clip_visual"]
    # fp32 weights + gradients + two AdamW moments, then the activations measured per image
    need = 16 * params + m.activation_bytes_per_image * per_worker
    have = req.gpu_memory_gb * GB
    if need <= have:
        return []
    fits = max(0, int((have - 16 * params) // max(1.0, m.activation_bytes_per_image)))
    return [f"--batch-size {req.trial.batch_size}: about {need / GB:.1f} GB per worker (weights, "
            f"AdamW, activations as measured in fp32), over --gpu-memory-gb {req.gpu_memory_gb:g}; "
            f"about {fits} images per worker fit"]


def storage_warnings(req: Request, storage: dict) -> list[str]:
    from regft import store

    root = req.settings.storage
    if store.is_uri(root):
        return []
    path = Path(root).resolve()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free
    if storage["total"] > free:
        return [f"--storage {root}: the search needs about {storage['total'] / GB:.1f} GB, "
                f"{free / GB:.1f} GB are free there"]
    return []


# -------------------------------------------------------------------------- output ----

def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * DAY_S:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / DAY_S:,.0f} d"


def render(plan: Plan, req: Request) -> str:
    s = plan.search
    lines = [f"regft.plan {req.task.name}: {s['trials']} trials on {plan.device} "
             f"(weights: {plan.weights.upper()})",
             f"  {'stage':<17}{'unit':<31}{'s/unit':>10}{'units':>12}{'projected':>12}{'peak mem':>10}"]
    for st in plan.stages:
        lines.append(f"  {st.name:<17}{st.unit[:30]:<31}{st.seconds_per_unit:>10.4g}{st.units:>12,}"
                     f"{_duration(st.projected_seconds):>12}{st.peak_memory_bytes / GB:>8.1f} GB")
        if st.note:
            lines.append(f"  {'':<17}  {st.note}")
    p = plan.parameters
    lines += [
        f"  parameters: UNet {p['unet']:,}, VAE {p['vae']:,}, text encoder {p['text_encoder']:,}, "
        f"CLIP visual {p['clip_visual']:,} ({p['clip_total']:,} in all)",
        f"  search: {s['concurrent']} trial(s) at once on {s['devices']} device(s), {s['rounds']} round(s) "
        f"of {_duration(s['trial_hours'] * 3600)} after generation ({_duration(s['generation_hours'] * 3600)}"
        f" on {s['generation_actors']} actor(s))",
        f"  projected wall time {_duration(plan.projected_search_hours * 3600)}, "
        f"{s['device_hours']:.1f} device-hours ({plan.projected_generation_device_hours:.1f} of them "
        "generation)",
        "  storage: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in plan.storage_bytes.items()),
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"  warning: {w}" for w in plan.warnings]
    if plan.weights == "random":
        lines.append("  (figures made with RANDOM weights: times, memory and bytes are the real job's)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main ----

def run_plan(req: Request) -> Plan:
    req, label, why = resolve_weights(req)
    if why is not None:
        print(RANDOM_BANNER.format(why=why), flush=True)
    device = device_name()
    cpu0, wall0 = os.times(), time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="regft-plan-") as tmp:
        g = measure_generation(req, device, Path(tmp))
        m = measure_clip(req, device, Path(tmp))
    plan = project(req, label, device, g, m)
    if device == "cpu":
        plan.notes += busy_note(cpu0, os.times(), time.perf_counter() - wall0)
    return plan


def busy_note(cpu0, cpu1, wall: float) -> list[str]:
    """On a shared CPU every measured time includes the waiting: say how much there was."""
    import torch

    threads = torch.get_num_threads()
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    share = used / (wall * threads) if wall > 0 else 1.0
    if share >= BUSY_SHARE:
        return []
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return [f"the machine was busy: the measurements got {share:.0%} of the {threads} CPU threads "
            f"they ran on (load average {load:.1f}); every time above includes that wait"]


@entry_point
def main(argv: list[str] | None = None) -> int:
    with console.session(verbose=False):
        req = parse_request(argv)
        if req.json_path:  # a folder that cannot take the file fails now, not after minutes
            Path(req.json_path).parent.mkdir(parents=True, exist_ok=True)
        plan = run_plan(req)
        print(render(plan, req))
        if req.json_path:
            Path(req.json_path).write_text(json.dumps(plan.to_json(), indent=1) + "\n")
            print(f"  plan: {req.json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
