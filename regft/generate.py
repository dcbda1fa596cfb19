"""Distributed generation of a labelled synthetic dataset with Ray Data (orchestration ring).

    python -m regft.generate cars                       # paper setting: SD 2.1-base, 64/class
    python -m regft.generate cars --generator tiny --images-per-class 4 --steps 2   # offline check
    python -m regft.generate --classnames my_classes.txt --store s3://bucket/regft

Flow (`generate_dataset`):
1. Validate everything first (config fields, task, generator availability, store writability,
   GPUs) and report every problem at once.
2. Items (regft.prompts) in item_id order -> dataset id = hash of everything that determines the
   images -> ``<store>/<id>``. A complete manifest there means nothing to do.
3. The driver cuts the items into fixed shards (shard k = items k*S .. k*S+S-1) and skips the
   shards already committed (verified by their item ids), so a re-run only generates what is
   missing and never duplicates an image.
4. A Ray Dataset with one row per missing shard -> `map_batches(ShardWorker, batch_size=1,
   compute=ActorPoolStrategy(size=n))`: each actor holds one diffusers pipeline, generates its
   shard in inference batches of `batch_size` (one torch.Generator per image) and commits the
   shard to the store atomically. A dead actor is restarted by Ray Data and its shard retried
   (same name, same content). The driver only sees small result rows (progress bar over shards).
5. Manifest written last (per-class counts, checksums), then `samples.png` next to it.

Why one row per shard rather than per image: shard names must be deterministic for exactly-once
writes, and Ray Data's batches do not align with chunk boundaries; a shard-sized unit of work
keeps naming in the driver's hands while the actor pool still batches inference internally.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import hashlib
import importlib.metadata as md
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 (pa.compute)
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from tqdm.auto import tqdm

from regft import console, faults, raylocal
from regft import store as st
from regft.cli import UserError, entry_point, shorten
from regft.config import (
    empty_value_problems,
    finite_float,
    flag_names,
    non_finite_fields,
    seed_problem,
)
from regft.generators import (
    BUILTIN_GENERATORS,
    DEFAULT_SCHEDULER,
    DTYPES,
    PAPER_GENERATOR,
    GeneratorSettingsError,
    make_generator,
    native_resolution,
    scheduler_class,
)
from regft.prompts import PROMPT_STRATEGIES, Item, make_items
from regft.shapes import parse_classname
from regft.tasks import Task, TaskError, resolve_task

DEFAULT_STORE = "./regft_data"
PAPER_OUTPUT_SIZE = 224  # method.md: 512 px generations saved at 224 x 224 (bicubic)
# env vars the actors need to see what the driver sees (caches, offline mode, OpenMP waiting);
# never credentials
FORWARDED_ENV = ("REGFT_CACHE", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HUGGINGFACE_HUB_CACHE",
                 "TRANSFORMERS_OFFLINE", "OMP_WAIT_POLICY")


# flags of this module's command line whose name is not the field's (the rest: --field-name)
GENERATE_FLAGS = {"classnames_file": "--classnames", "generator_options": "--generator-option"}
# the largest generation / saved image side: 4x what SD-class models are trained at (1024 px);
# beyond it one image's latents alone exhaust an accelerator's memory
MAX_IMAGE_SIZE = 4096


def generate_label(field_name: str) -> str:
    """A GenerationConfig field as this command line sets it: 'steps (--steps)'."""
    flag = GENERATE_FLAGS.get(field_name, "--" + field_name.replace("_", "-"))
    return f"{field_name} ({flag})"


@dataclass
class GenerationConfig:
    """One generation request. Defaults are the paper's (method.md); None = derived, see below."""

    task: str | None = None  # catalog task name (e.g. cars); with classnames_file: its name
    classnames_file: str | None = None  # a text file, one class name per line
    max_classes: int | None = None  # only the first N classes (quick runs; changes the dataset id)
    generator: str = PAPER_GENERATOR  # 'tiny', 'shapes', a diffusers model id or folder
    images_per_class: int = 64
    resolution: int | None = None  # None: the generator's native size (512 SD; 32 tiny/shapes)
    output_size: int | None = None  # None: 224 for SD models (method.md), else = resolution
    steps: int = 50
    guidance: float = 5.0
    # 'default' (the model's own) or a diffusers scheduler class name, e.g. DPMSolverMultistepScheduler
    scheduler: str = DEFAULT_SCHEDULER
    batch_size: int = 8  # images per inference call on one actor (not part of the dataset id)
    seed: int = 0  # base seed; per-image seeds derive from (task, class, index, seed)
    prompt_strategy: str = "paper"
    store: str | None = None  # None: $REGFT_STORE, else ./regft_data
    num_actors: int | None = None  # None: one per GPU (GPU mode) or one per node (CPU mode)
    use_gpu: bool | None = None  # None: GPUs when the cluster has any (not for 'shapes')
    dtype: str = "auto"  # auto = fp16 on GPU, fp32 on CPU
    shard_size: int = 64  # items per shard file (unit of work and of resume)
    generator_options: dict = field(default_factory=dict)  # shapes: gap; SD: revision, negative_prompt
    progress: bool = True
    samples: bool = True  # write samples.png next to the manifest

    def validate(self, label: Callable[[str], str] | None = None) -> list[str]:
        """Every problem with the fields alone (task, store and cluster are checked later).
        `label(field)` names a field the way the command in use sets it (default: this module's
        command line, `generate_label`; regft.tune passes its own flag names)."""
        n = label or generate_label
        p = []
        if not self.task and not self.classnames_file:
            p.append(f"task: give a task name (e.g. cars) or {n('classnames_file')}")
        p += [f"{n(f)} must be a finite number, got {getattr(self, f)}" for f in non_finite_fields(self)]
        if self.max_classes is not None and self.max_classes < 2:
            p.append(f"{n('max_classes')} must be >= 2 (a classifier needs two classes), "
                     f"got {self.max_classes}")
        for f in ("images_per_class", "steps", "batch_size", "shard_size"):
            if getattr(self, f) <= 0:
                p.append(f"{n(f)} must be >= 1, got {getattr(self, f)}")
        for f in ("num_actors", "output_size"):
            if getattr(self, f) is not None and getattr(self, f) <= 0:
                p.append(f"{n(f)} must be >= 1, got {getattr(self, f)}")
        p += self._size_problems(n)
        if self.guidance < 0:
            p.append(f"{n('guidance')} must be >= 0, got {self.guidance}")
        seed = seed_problem(self.seed, n("seed"))
        if seed:
            p.append(seed)
        if self.prompt_strategy not in PROMPT_STRATEGIES:
            p.append(f"{n('prompt_strategy')}: unknown {shorten(self.prompt_strategy)}; "
                     f"choose from {', '.join(sorted(PROMPT_STRATEGIES))}")
        if self.dtype not in DTYPES:
            p.append(f"{n('dtype')}: unknown {shorten(self.dtype)}; choose from {', '.join(DTYPES)}")
        if not self.generator:
            p.append(f"{n('generator')} must not be empty; e.g. {PAPER_GENERATOR} or tiny")
        if not isinstance(self.scheduler, str) or not self.scheduler.strip():
            p.append(f"{n('scheduler')} must be {DEFAULT_SCHEDULER} or a diffusers scheduler class "
                     f"name (e.g. DPMSolverMultistepScheduler), got {shorten(self.scheduler)}")
        return p

    def _size_problems(self, n: Callable[[str], str]) -> list[str]:
        p = []
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            p.append(f"{n('resolution')} must be a positive multiple of 8 (the VAE works "
                     f"on 8x8 patches), got {self.resolution}; e.g. "
                     f"{max(8, round(self.resolution / 8) * 8)}")
        for f in ("resolution", "output_size"):
            if (getattr(self, f) or 0) > MAX_IMAGE_SIZE:
                p.append(f"{n(f)} must be <= {MAX_IMAGE_SIZE} px, got {getattr(self, f)}")
        return p

    # derived values live here, next to the defaults, so they are computed in one place
    def effective_resolution(self) -> int:
        return self.resolution or native_resolution(self.generator)

    def effective_output_size(self) -> int:
        if self.output_size:
            return self.output_size
        if self.generator in BUILTIN_GENERATORS:  # saved at their native size
            return self.effective_resolution()
        return PAPER_OUTPUT_SIZE

    def effective_store(self) -> str:
        return self.store or os.environ.get("REGFT_STORE") or DEFAULT_STORE


@dataclass
class GenerationResult:
    path: str
    dataset_id: str
    total: int  # images in the dataset
    generated: int  # images generated by this call
    seconds: float  # wall time of this call's generation (0 when nothing was missing)
    manifest: dict
    shard_times: list[float] = field(default_factory=list)  # s after start when each shard landed

    @property
    def images_per_s(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class ActorPlan:
    num_actors: int
    num_cpus: float  # per actor
    num_gpus: float  # per actor
    device: str  # 'cuda' or 'cpu'
    threads: int  # torch intra-op threads per actor


# ------------------------------------------------------------- planning -----

def plan_actors(cfg: GenerationConfig, cluster: dict, node_cpus: list[float],
                pending_shards: int) -> ActorPlan:
    """Size the actor pool from the cluster (pure; raises UserError when it cannot fit).

    GPU mode: one actor per GPU (num_gpus=1 each). CPU mode: one actor per node by default; each
    actor takes an equal share of the CPUs (at most one node's worth) and uses them as torch
    threads, so one actor on a node is as fast as a plain process there.
    Never more actors than shards to do (an idle actor only costs start-up).
    """
    gpus = float(cluster.get("GPU", 0))
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else (gpus >= 1 and cfg.generator != "shapes")
    if use_gpu:
        if gpus < 1:
            raise UserError("use_gpu (--use-gpu) was requested but the Ray cluster has no GPU; "
                            "drop --use-gpu (CPU actors) or connect to a GPU cluster (RAY_ADDRESS)")
        n = cfg.num_actors or int(gpus)
        if n > gpus:
            raise UserError(f"num_actors (--num-actors) {n} exceeds the cluster's {int(gpus)} GPU(s) "
                            "(one GPU per actor); pass at most that many")
        n = max(1, min(n, pending_shards))
        return ActorPlan(n, 1.0, 1.0, "cuda", 1)
    node_cpus = [c for c in node_cpus if c >= 1] or [float(cluster.get("CPU", 1))]
    n = cfg.num_actors or len(node_cpus)
    if n > sum(int(c) for c in node_cpus):
        raise UserError(f"num_actors (--num-actors) {n} exceeds the cluster's "
                        f"{int(sum(node_cpus))} CPUs (each actor needs at least 1)")
    n = max(1, min(n, pending_shards))
    cpus = max(1, min(int(sum(node_cpus) // n), int(max(node_cpus))))
    while cpus > 1 and sum(int(c // cpus) for c in node_cpus) < n:  # must pack onto nodes
        cpus -= 1
    return ActorPlan(n, float(cpus), 0.0, "cpu", cpus)


def dataset_spec(cfg: GenerationConfig, task: Task, identity: dict) -> dict:
    """Everything that determines the images; its hash is the dataset id."""
    return {
        "format": st.FORMAT,
        "task": task.name,
        "classnames": list(task.classnames),
        "generation_classnames": list(task.gen_names),
        "generation_template": task.generation_template,
        "prompt_strategy": cfg.prompt_strategy,
        "generator": identity,
        "resolution": cfg.effective_resolution(),
        "output_size": cfg.effective_output_size(),
        "resize": "bicubic",
        "image_format": "png",
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "images_per_class": cfg.images_per_class,
        "seed": cfg.seed,
    }


def dataset_id(spec: dict) -> str:
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode())
    slug = "".join(c if c.isalnum() or c in "-_" else "_" for c in spec["task"])[:40]
    return f"{slug}-{digest.hexdigest()[:16]}"


def chunk(items: list[Item], shard_size: int) -> list[list[Item]]:
    return [items[i:i + shard_size] for i in range(0, len(items), shard_size)]


# ------------------------------------------------------ per-shard work -------

def generate_shard(generator, items: list[Item], batch_size: int, output_size: int,
                   fault: dict | None = None):
    """Generate one shard's items in inference batches; returns its Arrow table (item order).

    `fault` (tests only, regft.faults): {"item_id", "mode": "raise"|"exit", "marker": path} -- the
    first time any process reaches that item, raise or kill the process. ({"mode": "disk_full",
    "shard": k, ...} faults the shard's write instead: regft.store.write_shard.)
    """
    images: list[bytes] = []
    for b in range(0, len(items), batch_size):
        batch = items[b:b + batch_size]
        faults.at_items(fault, [it.item_id for it in batch])
        arrays = generator.generate([it.prompt for it in batch], [it.seed for it in batch],
                                    [it.label for it in batch], [it.classname for it in batch])
        # each (resolution, resolution, 3) uint8 -> (output_size, output_size, 3) -> PNG bytes
        images += [st.encode_png(st.resize(a, output_size)) for a in arrays]
    return st.shard_table([it.item_id for it in items], [it.label for it in items],
                          [it.classname for it in items], [it.prompt for it in items],
                          [it.seed for it in items], images)


def _items_to_json(items: list[Item]) -> str:
    return json.dumps([[it.label, it.index, it.classname, it.prompt, it.seed] for it in items])


def _items_from_json(s: str) -> list[Item]:
    return [Item(int(a), int(b), c, d, int(e)) for a, b, c, d, e in json.loads(s)]


class ShardWorker:
    """Ray Data actor: one generator (pipeline) per actor, one shard per input row."""

    def __init__(self, generator: str, resolution: int, steps: int, guidance: float, dtype: str,
                 options: dict, device: str, threads: int, dataset_path: str, output_size: int,
                 batch_size: int, fault: dict | None = None, scheduler: str = DEFAULT_SCHEDULER):
        if device == "cpu":
            torch.set_num_threads(threads)  # the CPUs Ray reserved for this actor
        self.generator = make_generator(generator, resolution=resolution, steps=steps,
                                        guidance=guidance, device=device, dtype=dtype,
                                        scheduler=scheduler, options=options)
        load = getattr(self.generator, "load", None)
        if callable(load):
            load()  # pay the pipeline load at actor start, not inside the first shard
        self.dataset_path, self.output_size = dataset_path, output_size
        self.batch_size, self.fault = batch_size, fault
        runtime = getattr(self.generator, "runtime", None)
        self.runtime = json.dumps(runtime() if callable(runtime) else {"device": device})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list] = {"record": [], "runtime": [], "seconds": []}
        for shard, items_json in zip(batch["shard"], batch["items"]):
            t0 = time.perf_counter()
            items = _items_from_json(str(items_json))
            table = generate_shard(self.generator, items, self.batch_size, self.output_size,
                                   self.fault)
            rec = st.write_shard(self.dataset_path, int(shard), table, fault=self.fault)
            out["record"].append(json.dumps(rec))
            out["runtime"].append(self.runtime)
            out["seconds"].append(time.perf_counter() - t0)
        return {k: np.asarray(v) for k, v in out.items()}


# ------------------------------------------------------------ the driver -----

def ensure_ray():
    """Connect to RAY_ADDRESS or start a local Ray, unless Ray is already initialised."""
    return raylocal.init(quiet=True)


def _cluster_cpus_per_node(ray) -> list[float]:
    return [float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]


SHAPES_LISTED = 3  # class names the shapes generator cannot draw, quoted
# the driver's item list: ~260 B per item measured (ids, prompts, seeds), held with its sorted
# copy and each shard's JSON at once: 1 KiB per item
ITEM_BYTES = 1024


def _shapes_class_problems(generation: GenerationConfig, task: Task | None) -> list[str]:
    if generation.generator != "shapes" or task is None:
        return []
    bad = []
    for name in task.gen_names:
        try:
            parse_classname(name)
        except UserError:
            bad.append(name)
    if not bad:
        return []
    shown = ", ".join(shorten(b, 40) for b in bad[:SHAPES_LISTED])
    return [f"--generator shapes: it draws the testbed's '<colour> <shape>' classes only (e.g. "
            f"'red circle'); {len(bad)} of task {task.name!r}'s class names are not: {shown}"
            f"{' ...' if len(bad) > SHAPES_LISTED else ''}; use another --generator"]


def available_memory() -> int:
    """Bytes of memory free for a new allocation: Linux's MemAvailable, else all physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _item_list_problems(generation: GenerationConfig, task: Task | None) -> list[str]:
    if task is None:
        return []
    items = task.num_classes * generation.images_per_class
    need, have = items * ITEM_BYTES, available_memory()
    if need <= have:
        return []
    return [f"--images-per-class {generation.images_per_class}: {task.num_classes} classes x "
            f"{generation.images_per_class} = {items:,} images; their item list alone needs about "
            f"{need / 2**30:,.1f} GiB of memory, this machine has {have / 2**30:,.1f} GiB free; "
            "lower --images-per-class"]


def request_size_problems(cfg: GenerationConfig, task: Task | None) -> list[str]:
    """What would fail only once generation runs: class names the shapes generator cannot draw,
    an item list that cannot fit in this machine's memory (regft.generate and regft.tune)."""
    return _shapes_class_problems(cfg, task) + _item_list_problems(cfg, task)


def request_task(cfg: GenerationConfig) -> Task:
    """The task a request generates for. The dataset id and every per-image seed hash the task's
    name: the first N classes keep the whole task's name, so they get exactly the images the whole
    task's dataset has for them (and the ids of datasets made before stay the same)."""
    whole = resolve_task(cfg.task, cfg.classnames_file)
    return dataclasses.replace(whole.first(cfg.max_classes), name=whole.name)


def request_items(cfg: GenerationConfig, task: Task) -> list[Item]:
    """The dataset's items in id order (what the shards and the manifest list)."""
    return sorted(make_items(task.name, list(task.gen_names), task.generation_template,
                             cfg.images_per_class, cfg.seed, cfg.prompt_strategy),
                  key=lambda it: it.item_id)


def check_request(cfg: GenerationConfig, label: Callable[[str], str] | None = None):
    """Validate a request; returns (task, generator) or raises UserError with every problem.
    `label` names a field as the command in use sets it (GenerationConfig.validate)."""
    problems = list(cfg.validate(label))
    task = None
    if cfg.task or cfg.classnames_file:
        try:
            task = request_task(cfg)
        except TaskError as e:
            problems.append(str(e))
    if not any(p.startswith("store") for p in problems):
        err = st.check_writable(cfg.effective_store())
        if err:
            problems.append(err)
    generator = None
    # the generator is only built when its own fields are valid (else its error repeats them)
    fields = ("resolution", "steps", "dtype", "generator", "scheduler")
    if not any(p.startswith(fields) for p in problems):
        generator, refused = build_generator(cfg, label)
        problems += refused
    elif _unknown_scheduler(cfg.scheduler):  # known without the model: say it now too
        problems.append(f"{(label or generate_label)('scheduler')}: {shorten(cfg.scheduler)} is not "
                        f"a diffusers scheduler class; give {DEFAULT_SCHEDULER} or e.g. "
                        "DPMSolverMultistepScheduler")
    if problems:
        raise UserError(problems)
    return task, generator


def _unknown_scheduler(name) -> bool:
    named = isinstance(name, str) and name.strip() and name != DEFAULT_SCHEDULER
    return bool(named) and scheduler_class(name) is None


def request_generator(cfg: GenerationConfig, device: str = "cpu"):
    """The generator a request describes (make_generator with the request's settings)."""
    return make_generator(cfg.generator, resolution=cfg.effective_resolution(), steps=cfg.steps,
                          guidance=cfg.guidance, device=device, dtype=cfg.dtype,
                          scheduler=cfg.scheduler, options=cfg.generator_options)


def _refused(e: GeneratorSettingsError, label: Callable[[str], str] | None) -> list[str]:
    n = label or generate_label
    return [f"{n(name)}: {problem} (generator {shorten(e.generator)})" for name, problem in e.settings]


def build_generator(cfg: GenerationConfig, label: Callable[[str], str] | None = None):
    """(the request's generator, []) or (None, its problems): settings the model's pipeline
    cannot take, each named by `label` (default: this module's flags); a model that cannot be
    found or loaded, in one line."""
    try:
        return request_generator(cfg), []
    except GeneratorSettingsError as e:
        return None, _refused(e, label)
    except (ValueError, TypeError, RuntimeError, ImportError) as e:
        # WeightsUnavailable is a RuntimeError: reported as one line, no traceback
        msg = str(e)
        msg = msg if msg.startswith("generator") else f"generator {shorten(cfg.generator)}: {msg}"
        options = [k for k in cfg.generator_options if str(k) in msg]
        if options:  # an option the generator refused: say where it came from
            msg += f" (set by --generator-option {options[0]}=...)"
        return None, [msg]


def generator_setting_problems(cfg: GenerationConfig, label: Callable[[str], str] | None = None
                               ) -> list[str]:
    """Only the settings the model's pipeline cannot take (build_generator's first kind); a model
    that cannot be found says nothing here (regft.plan prices such a model with random weights)."""
    try:
        request_generator(cfg)
    except GeneratorSettingsError as e:
        return _refused(e, label)
    except (ValueError, TypeError, RuntimeError, ImportError):
        pass  # reported where the model is needed
    return []


@dataclass(frozen=True)
class DatasetPlan:
    """What a request resolves to: the task, the generator's identity, the spec that determines
    the images (its hash is the dataset id), the dataset's location and its items in id order."""

    task: Task
    identity: dict
    spec: dict
    dataset_id: str
    path: str
    items: list[Item]


@dataclass
class PipelineRun:
    """What the Ray Data job of one call committed."""

    records: dict[int, dict] = field(default_factory=dict)  # shard index -> manifest record
    runtimes: dict[str, int] = field(default_factory=dict)  # actor runtime (JSON) -> shards
    shard_times: list[float] = field(default_factory=list)  # s after start when each landed
    seconds: float = 0.0


def generate_dataset(cfg: GenerationConfig, *, fault: dict | None = None,
                     executor: str = "ray") -> GenerationResult:
    """Make sure the dataset `cfg` describes is complete in the store; generate what is missing
    (the module docstring's flow, one named step each). One process generates a dataset at a
    time (a claim in the store): a concurrent request waits and then finds it complete. Images
    a complete dataset of the same family (`family_spec`: equal settings but images_per_class)
    holds are copied, not generated: all of them for a smaller request (`serve_prefix`), its
    first images per class for a larger one (`grow_from`). `executor`: "ray" (Ray Data actors)
    or "inline" (this process, one generator: small jobs, tests)."""
    plan = plan_dataset(cfg)                                              # 1. validate, id, items
    done = complete_result(plan)                                          # 2. a run before this
    if done is not None:
        return done
    held = st.claim(plan.path, lambda: complete_result(plan) is not None)  # 3. one generator
    if held is None:  # another process finished it while this one waited
        return complete_result(plan)
    with held:
        done = complete_result(plan)  # finished between our check and our claim
        if done is not None:
            return done
        larger, smaller = family_datasets(cfg, plan)                      # 4. images that exist
        if larger is not None:
            return serve_prefix(cfg, plan, *larger)
        if smaller is not None:
            return grow_from(cfg, plan, *smaller, fault=fault, executor=executor)
        return generate_missing(cfg, plan, fault, executor)               # 5. generate


def complete_result(plan: DatasetPlan) -> GenerationResult | None:
    """The result of a request whose dataset is complete already (0 generated), else None."""
    existing = read_existing_manifest(plan)
    if existing and existing.get("complete") and _all_shards_present(plan.path, existing):
        return GenerationResult(plan.path, plan.dataset_id, len(plan.items), 0, 0.0, existing)
    return None


def generate_missing(cfg: GenerationConfig, plan: DatasetPlan, fault: dict | None,
                     executor: str) -> GenerationResult:
    """Steps 3-7 of the module docstring, under the dataset's claim."""
    existing = read_existing_manifest(plan)
    shards, manifest = lay_out_shards(cfg, plan, existing)                # fixed shards
    pending = pending_shards(plan.path, shards)                           # what is missing
    run = generate_shards(cfg, plan, shards, pending, fault, executor)    # Ray Data actors
    records = verified_records(plan.path, shards, run.records)            # all shards there
    generated = sum(len(shards[k]) for k in pending)
    write_final_manifest(cfg, plan.path, manifest, records, run, generated)  # manifest, samples
    return GenerationResult(plan.path, plan.dataset_id, len(plan.items), generated, run.seconds,
                            manifest, run.shard_times)


def family_spec(spec: dict) -> dict:
    """A dataset spec without its count: datasets of one family differ only in images_per_class,
    and the first N images of each class are the same images in all of them (item seeds hash
    (task, class, image index, base seed); prompts depend on the index only)."""
    return {k: v for k, v in spec.items() if k != "images_per_class"}


Found = tuple[str, dict]  # (dataset path, its manifest)


def family_datasets(cfg: GenerationConfig, plan: DatasetPlan) -> tuple[Found | None, Found | None]:
    """The complete datasets in the store of the request's family closest to it in size: the
    smallest with more images per class, the largest with fewer (each None if there is none)."""
    store, want = cfg.effective_store(), cfg.images_per_class
    slug = plan.dataset_id.rsplit("-", 1)[0] + "-"  # ids open with the task's slug: a cheap filter
    family, larger, smaller = family_spec(plan.spec), None, None
    for name in st.list_datasets(store):
        if not name.startswith(slug) or name == plan.dataset_id:
            continue
        path = st.dataset_path(store, name)
        m = st.read_manifest(path)
        spec = (m or {}).get("spec") or {}
        if not (m and m.get("complete") and family_spec(spec) == family
                and _all_shards_present(path, m)):
            continue
        n = spec["images_per_class"]
        if n > want and (larger is None or n < larger[1]["spec"]["images_per_class"]):
            larger = (path, m)
        if n < want and (smaller is None or n > smaller[1]["spec"]["images_per_class"]):
            smaller = (path, m)
    return larger, smaller


def serve_prefix(cfg: GenerationConfig, plan: DatasetPlan, source: str, source_manifest: dict
                 ) -> GenerationResult:
    """The request's dataset made of the first images per class of the larger dataset at
    `source` (same item ids, seeds and prompts: checked row by row); 0 generated. The train/val
    rule depends on the item id only, so shared items keep their split."""
    t0 = time.perf_counter()
    shards, manifest = lay_out_shards(cfg, plan, read_existing_manifest(plan))
    records = assemble_shards(plan, shards, [st.shard_paths(source, source_manifest)])
    manifest["derived_from"] = _derived(source_manifest, len(plan.items))
    run = PipelineRun(records=records, seconds=time.perf_counter() - t0)
    write_final_manifest(cfg, plan.path, manifest, verified_records(plan.path, shards, records), run, 0)
    return GenerationResult(plan.path, plan.dataset_id, len(plan.items), 0, 0.0, manifest)


GROW_DIR = "_grow"  # inside a dataset being grown: its new images, as shards of their own


def grow_from(cfg: GenerationConfig, plan: DatasetPlan, source: str, source_manifest: dict, *,
              fault: dict | None, executor: str) -> GenerationResult:
    """The request's dataset from the smaller dataset at `source` (its images: copied) and the
    images it lacks (index >= its images_per_class), generated as a job of their own under
    GROW_DIR (resumable like any generation), then merged in item order."""
    have = source_manifest["spec"]["images_per_class"]
    new_items = [it for it in plan.items if it.index >= have]
    grow = dataclasses.replace(plan, items=new_items, path=st.join(plan.path, GROW_DIR))
    grow_shards = chunk(new_items, cfg.shard_size)
    pending = pending_shards(grow.path, grow_shards)
    run = generate_shards(cfg, grow, grow_shards, pending, fault, executor)
    verified_records(grow.path, grow_shards, run.records)
    shards, manifest = lay_out_shards(cfg, plan, read_existing_manifest(plan))
    grown = (st.filesystem(grow.path)[0], list(st.list_shards(grow.path).values()))
    records = assemble_shards(plan, shards, [st.shard_paths(source, source_manifest), grown])
    generated = sum(len(grow_shards[k]) for k in pending)
    manifest["derived_from"] = _derived(source_manifest, len(plan.items) - len(new_items))
    write_final_manifest(cfg, plan.path, manifest, verified_records(plan.path, shards, records),
                         dataclasses.replace(run, records=records), generated)
    st.delete_dir(grow.path)
    return GenerationResult(plan.path, plan.dataset_id, len(plan.items), generated, run.seconds,
                            manifest, run.shard_times)


def _derived(source_manifest: dict, copied: int) -> dict:
    return {"dataset_id": source_manifest["dataset_id"], "copied_images": copied,
            "images_per_class": source_manifest["spec"]["images_per_class"]}


def assemble_shards(plan: DatasetPlan, shards: list[list[Item]], sources: list[tuple]) -> dict[int, dict]:
    """Write the request's pending shards from rows that exist: `sources` are (filesystem, shard
    files) whose rows together hold every item (each in item_id order). Each written shard is
    checked to hold exactly its items (ids, labels, prompts, seeds). Returns {shard: record}."""
    pending = pending_shards(plan.path, shards)
    where: dict[str, tuple[int, str]] = {}  # item_id -> (source, file): ids only are read here
    for n, (fs, files) in enumerate(sources):
        for f in files:
            for item_id in pq.read_table(f, columns=["item_id"], filesystem=fs).column("item_id").to_pylist():
                where.setdefault(item_id, (n, f))
    records, cache = {}, {}
    for k in pending:
        ids = [it.item_id for it in shards[k]]
        missing = [i for i in ids if i not in where]
        if missing:
            raise RuntimeError(f"{plan.path}: {len(missing)} item(s) of shard {k} are in none of "
                               "the datasets it is assembled from")
        files = list(dict.fromkeys(where[i] for i in ids))
        # consecutive shards share source files: keep the files of the previous shard
        cache = {f: cache.get(f) or pq.read_table(f[1], filesystem=sources[f[0]][0]) for f in files}
        rows = pa.concat_tables([cache[f] for f in files])
        rows = rows.take(_positions(rows.column("item_id").to_pylist(), ids))
        records[k] = st.write_shard(plan.path, k, _checked_rows(rows, shards[k], plan.path))
    return records


def _positions(have: list[str], want: list[str]) -> list[int]:
    at = {i: n for n, i in enumerate(have)}
    return [at[i] for i in want]


def _checked_rows(table, items: list[Item], where: str):
    """`table` when its rows are exactly `items` (id, label, prompt, seed), else RuntimeError."""
    columns = ("item_id", "label", "prompt", "seed")
    got = [tuple(r) for r in zip(*(table.column(c).to_pylist() for c in columns))]
    want = [(it.item_id, it.label, it.prompt, it.seed) for it in items]
    if got != want:
        raise RuntimeError(f"{where}: rows copied from another dataset differ from the request's "
                           "items (ids, prompts or seeds); move that dataset away and re-run")
    return table.combine_chunks()


def plan_dataset(cfg: GenerationConfig) -> DatasetPlan:
    task, generator = check_request(cfg)
    identity = generator.identity()
    spec = dataset_spec(cfg, task, identity)
    did = dataset_id(spec)
    items = request_items(cfg, task)
    return DatasetPlan(task, identity, spec, did, st.dataset_path(cfg.effective_store(), did), items)


def read_existing_manifest(plan: DatasetPlan) -> dict | None:
    """The manifest already at the dataset's path (None: a new dataset); refused if it describes
    another dataset."""
    existing = st.read_manifest(plan.path)
    if existing is not None and existing.get("spec") != plan.spec:
        raise UserError(f"{plan.path}: manifest describes a different dataset (hash collision or an "
                        "edited manifest); move it away and re-run")
    return existing


def _all_shards_present(path: str, manifest: dict) -> bool:
    on_disk = st.list_shards(path)
    return all(s["index"] in on_disk for s in manifest["shards"])


def lay_out_shards(cfg: GenerationConfig, plan: DatasetPlan, existing: dict | None):
    """The items cut into shards, and the manifest that records the layout (written at once for a
    new or re-made dataset, with complete=false while anything is missing)."""
    # the shard layout of a started dataset wins over the request: resume must cut items the same way
    shard_size = (existing or {}).get("layout", {}).get("shard_size") or cfg.shard_size
    shards = chunk(plan.items, shard_size)
    manifest = _base_manifest(cfg, plan.task, plan.spec, plan.dataset_id, plan.items, shard_size,
                              len(shards))
    if existing is None or existing.get("complete"):
        st.write_manifest(plan.path, manifest)
    return shards, manifest


def pending_shards(path: str, shards: list[list[Item]]) -> list[int]:
    """Shards still to generate. A committed shard is kept when it holds exactly the expected
    items; a corrupt or foreign one is deleted (a name in shards/ is never half-written here)."""
    kept: set[int] = set()
    for k in sorted(st.list_shards(path)):
        if k < len(shards) and st.shard_item_ids(path, k) == [it.item_id for it in shards[k]]:
            kept.add(k)
        else:
            st.delete_shard(path, k)
    return [k for k in range(len(shards)) if k not in kept]


EXECUTORS = ("ray", "inline")


def generate_shards(cfg: GenerationConfig, plan: DatasetPlan, shards: list[list[Item]],
                    pending: list[int], fault: dict | None, executor: str = "ray") -> PipelineRun:
    run = PipelineRun()
    if not pending:
        return run
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "ray":
        ensure_ray()  # start-up (seconds) is not counted as generation time
    t_gen = time.perf_counter()
    runner = _run_pipeline if executor == "ray" else _run_inline
    for rec, runtime, t in runner(cfg, plan.identity, plan.path, shards, pending, fault):
        run.records[rec["index"]] = rec
        run.runtimes[runtime] = run.runtimes.get(runtime, 0) + 1
        run.shard_times.append(t - t_gen)
    run.seconds = time.perf_counter() - t_gen
    return run


def verified_records(path: str, shards: list[list[Item]], new_records: dict[int, dict]) -> list[dict]:
    """Every shard's manifest record, in order, each checked to be on disk with all its rows."""
    on_disk = st.list_shards(path)
    unseen = [k for k in new_records if k not in on_disk]
    if unseen:
        raise RuntimeError(
            f"{len(unseen)} shard(s) the actors committed are not visible at {path}: on a "
            "multi-node cluster the store must be shared (a URI such as s3://bucket/prefix, or "
            "a filesystem mounted at the same path on every node)")
    records = []
    for k in range(len(shards)):
        # shards kept from an earlier run get their checksum now (one read each)
        rec = new_records.get(k) or st.shard_record(path, k)
        if not rec or rec["rows"] != len(shards[k]):
            raise RuntimeError(f"shard {k} of {path} is missing or damaged after generation")
        records.append(rec)
    return records


def write_final_manifest(cfg: GenerationConfig, path: str, manifest: dict, records: list[dict],
                         run: PipelineRun, generated: int) -> None:
    """The manifest, written last (complete=true), then samples.png next to it."""
    devices: dict[str, int] = {}
    for runtime, n in run.runtimes.items():
        r = json.loads(runtime)
        key = f"{r.get('device', '?')}/{r.get('torch_dtype', '-')}"  # placeholders for display
        devices[key] = devices.get(key, 0) + n
    manifest.update(
        complete=True,
        shards=records,
        runtime={"shards_by_device": devices, "generation_seconds": round(run.seconds, 3),
                 "generated_images": generated, "versions": _versions()},
    )
    st.write_manifest(path, manifest)
    st.clear_tmp(path)
    if cfg.samples:
        st.write_sample_grid(path, manifest)


def ensure_dataset(cfg: GenerationConfig) -> str:
    """The path of the complete dataset `cfg` describes, generating only what is missing."""
    return generate_dataset(cfg).path


def _base_manifest(cfg, task, spec, did, items, shard_size, num_shards) -> dict:
    counts = [0] * task.num_classes
    for it in items:
        counts[it.label] += 1
    return {
        "format": st.FORMAT,
        "dataset_id": did,
        "complete": False,
        "spec": spec,
        "task": {"name": task.name, "source": task.source, "classnames": list(task.classnames),
                 "generation_classnames": list(task.gen_names),
                 "generation_template": task.generation_template},
        "generator": spec["generator"],
        "settings": {k: spec[k] for k in ("resolution", "output_size", "steps", "guidance",
                                           "images_per_class", "seed", "prompt_strategy",
                                           "resize", "image_format")},
        "layout": {"shard_size": shard_size, "num_shards": num_shards, "num_items": len(items),
                   "columns": st.SCHEMA.names},
        "num_images": len(items),
        "class_counts": counts,
        "split_rule": "val iff int.from_bytes(sha256(item_id)[:8], 'big') / 2**64 < val_fraction",
        "shards": [],
    }


def _versions() -> dict:
    out = {}
    for pkg in ("regft", "diffusers", "torch", "ray", "transformers"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _run_pipeline(cfg, identity, path, shards, pending, fault):
    """Run the Ray Data job over the pending shards; returns [(record, runtime json, arrival)]."""
    plan = plan_actors(cfg, ray.cluster_resources(), _cluster_cpus_per_node(ray), len(pending))
    options = dict(cfg.generator_options)
    if identity.get("generator") == "diffusers" and cfg.generator not in BUILTIN_GENERATORS \
            and not os.path.isdir(cfg.generator):
        options["revision"] = identity["revision"]  # every actor loads the commit the id names
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    rows = [{"shard": k, "items": _items_to_json(shards[k])} for k in pending]
    ctx = ray.data.DataContext.get_current()
    old_bars = ctx.enable_progress_bars
    ctx.enable_progress_bars = False  # the driver's own bar counts shards and images
    try:
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))  # one shard per block
        ds = ds.map_batches(
            ShardWorker,
            batch_size=1,  # one shard per call; the actor batches inference inside it
            compute=ray.data.ActorPoolStrategy(size=plan.num_actors),
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            fn_constructor_kwargs=worker_kwargs(cfg, options, plan.device, plan.threads, path, fault),
            # Ray Data's actor defaults (max_restarts=-1, max_task_retries=-1) replace a dead
            # actor and retry its shard; 2.60 deprecates passing other values here.
            runtime_env={"env_vars": env} if env else None,
        )
        results = []
        n_images = sum(len(shards[k]) for k in pending)
        with tqdm(total=n_images, unit="img", disable=not cfg.progress,
                  desc=f"generating {len(pending)} shard(s) on {plan.num_actors} actor(s)") as bar:
            disk_full = False
            try:
                for row in ds.iter_rows():
                    rec = json.loads(row["record"])
                    results.append((rec, str(row["runtime"]), time.perf_counter()))
                    bar.update(rec["rows"])
            except Exception as e:
                if not _is_disk_full(e):
                    raise
                disk_full = True
        if disk_full:  # raised outside the handler and without `ds`: a live reference to the
            # failed job keeps its actors, and with them the CPUs a re-run in this process needs
            del ds
            raise OSError(errno.ENOSPC, f"the store {path} ran out of space (No space left on "
                          f"device) after {len(results)} of {len(pending)} shard(s); nothing "
                          "partial was kept: free space and re-run the same command (only the "
                          "missing shards are generated)")
    finally:
        ctx.enable_progress_bars = old_bars
    return results


def worker_kwargs(cfg: GenerationConfig, options: dict, device: str, threads: int, path: str,
                  fault: dict | None) -> dict:
    """ShardWorker's constructor arguments for `cfg` (Ray Data actors and the inline runner)."""
    return dict(generator=cfg.generator, resolution=cfg.effective_resolution(), steps=cfg.steps,
                guidance=cfg.guidance, dtype=cfg.dtype, options=options, device=device,
                threads=threads, dataset_path=path, output_size=cfg.effective_output_size(),
                batch_size=cfg.batch_size, fault=fault, scheduler=cfg.scheduler)


def _run_inline(cfg, identity, path, shards, pending, fault):
    """The pending shards generated in this process by one ShardWorker (what one Ray Data actor
    does, without Ray): for small jobs and for tests of what happens around generation."""
    worker = ShardWorker(**worker_kwargs(cfg, dict(cfg.generator_options), "cpu",
                                         torch.get_num_threads(), path, fault))
    for k in pending:
        out = worker({"shard": np.asarray([k]), "items": np.asarray([_items_to_json(shards[k])])})
        yield json.loads(str(out["record"][0])), str(out["runtime"][0]), time.perf_counter()


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in a (Ray-wrapped) exception chain. Ray Data re-raises a UDF's error as
    RayTaskError(UserCodeException) that keeps the original only as text, hence the text test."""
    seen, text = set(), f"[Errno {errno.ENOSPC}] {os.strerror(errno.ENOSPC)}"
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or text in str(e):
            return True
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return False


# ------------------------------------------------------------------- CLI ----

USAGE = "%(prog)s [TASK] [--classnames FILE] [--FLAG VALUE ...]   (every flag: --help)"


def build_parser() -> argparse.ArgumentParser:
    d = GenerationConfig()
    p = argparse.ArgumentParser(
        prog="python -m regft.generate", usage=USAGE,  # an error prints the usage: keep it one line
        description="Generate a labelled synthetic dataset for a task's class names with a "
                    "text-to-image model, on every GPU (or CPU) of a Ray cluster.",
    )
    p.add_argument("task", nargs="?", help="catalog task (e.g. cars); with --classnames, its name")
    p.add_argument("--classnames", dest="classnames_file", metavar="FILE",
                   help="text file with one class name per line (label order)")
    p.add_argument("--max-classes", type=int, help="only the first N classes (quick runs)")
    p.add_argument("--generator", help=f"'tiny' (offline), 'shapes', a diffusers model id or "
                   f"folder (default {d.generator})")
    p.add_argument("--images-per-class", type=int, help=f"(default {d.images_per_class})")
    p.add_argument("--resolution", type=int, help="generation size in px, multiple of 8 "
                   "(default: 512 for SD models, 32 for tiny/shapes)")
    p.add_argument("--output-size", type=int, help="saved image size, bicubic (default: 224 for "
                   "SD models, else the resolution)")
    p.add_argument("--steps", type=int, help=f"denoising steps (default {d.steps})")
    p.add_argument("--guidance", type=finite_float, help=f"classifier-free guidance (default "
                   f"{d.guidance}; <= 1 turns it off: Turbo models take 0)")
    p.add_argument("--scheduler", help=f"{DEFAULT_SCHEDULER} (the model's own, the default) or a "
                   "diffusers scheduler class the model can use, e.g. DPMSolverMultistepScheduler")
    p.add_argument("--batch-size", type=int, help=f"images per inference call (default {d.batch_size})")
    p.add_argument("--store", help="dataset store folder or URI (default $REGFT_STORE or ./regft_data)")
    p.add_argument("--seed", type=int, help=f"base seed (default {d.seed})")
    p.add_argument("--num-actors", type=int, help="actors (default: one per GPU, else one per node)")
    p.add_argument("--prompt-strategy", choices=sorted(PROMPT_STRATEGIES),
                   help=f"how class names become prompts (default {d.prompt_strategy})")
    p.add_argument("--use-gpu", action=argparse.BooleanOptionalAction,
                   help="one GPU per actor (default: when the cluster has GPUs)")
    p.add_argument("--dtype", choices=DTYPES, help="precision (default auto: fp16 on GPU, fp32 on CPU)")
    p.add_argument("--shard-size", type=int, help=f"images per shard file (default {d.shard_size})")
    p.add_argument("--generator-option", action="append", default=[], metavar="KEY=VALUE",
                   help="generator option, repeatable (shapes: gap=0.5; SD: revision=..., "
                        "negative_prompt=...); VALUE is parsed as JSON when it can be")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (workers' logs); the full log is written either way")
    p.add_argument("--no-samples", action="store_true", help="do not write samples.png")
    p.add_argument("--json", metavar="PATH", help="also write the result to this file as JSON: "
                   '{"dataset", "dataset_id", "images", "generated"} (generated: images made by '
                   "this call, 0 when the dataset existed)")
    return p


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")


def config_from_args(args: argparse.Namespace) -> GenerationConfig:
    names = {f.name for f in dataclasses.fields(GenerationConfig)}
    kwargs = {k: v for k, v in vars(args).items() if k in names and v is not None}
    options = {}
    problems = empty_value_problems(args, flag_names(build_parser()))
    for opt in args.generator_option:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            problems.append(f"--generator-option {shorten(opt)}: expected KEY=VALUE, e.g. gap=0.5")
            continue
        try:  # NaN / Infinity are not numbers here: kept as text, refused by the generator
            options[key] = json.loads(value, parse_constant=_refuse_constant)
        except ValueError:
            options[key] = value
    if problems:
        raise UserError(problems)
    kwargs.pop("generator_option", None)
    if options:
        kwargs["generator_options"] = options
    kwargs["progress"] = not args.no_progress
    kwargs["samples"] = not args.no_samples
    return GenerationConfig(**kwargs)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    problems = json_path_problems(args.json)
    try:  # the fields, the class names, the store, the generator: before Ray
        task, _ = check_request(cfg)
    except UserError as e:
        raise UserError(problems + e.problems) from None
    problems += request_size_problems(cfg, task)
    if problems:
        raise UserError(problems)
    with console.session(verbose=args.verbose):  # a full log; the terminal: the bar, the result
        return _generate_and_print(cfg, args.verbose, args.json)


def json_path_problems(path: str | None) -> list[str]:
    """Why the --json result file could not be written (checked before any work), if it could not."""
    if path is None or not path.strip():  # an empty value: reported by empty_value_problems
        return []
    if st.is_uri(path):
        return [f"--json {shorten(path)}: give a local file path"]
    if os.path.isdir(path):
        return [f"--json {shorten(path)} is a folder; give a file path, e.g. "
                f"{os.path.join(path, 'result.json')}"]
    problem = st.check_writable(os.path.dirname(os.path.abspath(path)), flag="--json")
    return [problem] if problem else []


def result_json(res: GenerationResult) -> dict:
    """What --json writes: where the dataset is, its id, its images and how many this call made."""
    return {"dataset": res.path, "dataset_id": res.dataset_id, "images": res.total,
            "generated": res.generated}


def write_result_json(path: str, res: GenerationResult) -> None:
    """The --json file, written whole or not at all (a reader never sees half a file)."""
    target = os.path.abspath(path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(result_json(res), f, indent=1)
        f.write("\n")
    os.replace(tmp, target)


def _generate_and_print(cfg: GenerationConfig, verbose: bool, json_path: str | None = None) -> int:
    started_here = not ray.is_initialized()
    try:
        raylocal.init(quiet=not verbose)  # --verbose: Ray's own logging and the workers' output
        res = generate_dataset(cfg)
    finally:
        if started_here and ray.is_initialized():
            ray.shutdown()
    if res.generated:
        print(f"generated {res.generated} images ({res.total - res.generated} already present) "
              f"in {res.seconds:.1f} s, {res.images_per_s:.2f} images/s")
    else:
        print(f"dataset complete, nothing to generate ({res.total} images)")
    print(f"dataset: {res.path}")
    print(f"manifest: {st.join(res.path, st.MANIFEST)}")
    if cfg.samples:
        print(f"samples: {st.join(res.path, st.SAMPLES)}")
    if json_path:
        write_result_json(json_path, res)
        print(f"result: {json_path}")
    sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())
