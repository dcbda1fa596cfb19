"""Text-to-image generators behind one small protocol (assembly ring: single process, no Ray).

`make_generator(name, ...)` returns an `ImageGenerator`:
- `tiny`, `tiny-sdxl`: offline tiny Stable Diffusion / SDXL pipelines (regft.tiny_diffusion),
  materialised once under REGFT_CACHE and loaded like any saved folder (below).
- `shapes`: the procedural testbed (`regft.shapes.ShapesGenerator`), pure numpy.
- anything else: a diffusers model id (SD 1.5 / 2.1, SDXL, SD-/SDXL-Turbo, ...) or a folder saved
  with `save_pretrained`, loaded with `AutoPipelineForText2Image.from_pretrained`, which picks the
  text-to-image pipeline class from the model's model_index.json.

What a pipeline takes is read from the model's small config files before any weights load
(`PipelineFacts`: its pipeline class, scheduler, VAE factor), so a setting it cannot take (a
scheduler it cannot use, guidance for a pipeline without it, a size the VAE cannot encode) is
refused when the generator is made (`GeneratorSettingsError`, each problem naming its
GenerationConfig field). Pipeline-specific inputs are the pipeline's own: SDXL derives its size
conditioning (original/target size, the added time ids) from height and width; guidance <= 1
turns classifier-free guidance off (Turbo models: --guidance 0).
- option `weights: random` (regft.tune --weights random): the model's real architecture from the
  configs shipped in regft (regft.realsize; SD 2.1-base), seeded random weights, no download;
  the dataset's identity says so (its revision and `weights`), so it never passes for real images.

Reproducibility: every image gets its own CPU `torch.Generator` seeded with the item's seed, so
its initial latents depend only on that seed (diffusers' `randn_tensor` draws one latent per
generator, on the CPU, then moves it to the device). Every other step of the pipeline is
per-sample, so an image depends on (identity, prompt, seed) and not on its batch or actor, up to
float rounding: CPU kernels (oneDNN/MKL) pick their blocking by batch shape *and* thread count,
so the same item generated in another batch size moves at most one 8-bit level on well under
0.1 % of pixels (measured and tested; same batching and threads: bit for bit). Inference one
image at a time would not remove this (1 vs 2 torch threads differ the same way), so batches
stay: they are what makes GPU generation fast. GPU kernels behave alike. What is exact: item
ids, prompts, seeds, initial latents, and the work done: a stored item is never regenerated,
so a dataset, once written, never changes.

Construction is cheap and fails fast: the weights are located (and a missing, unreachable model is
reported in one line) when the generator is made, but loaded only on first `generate`, so the
driver can compute `identity()` without loading a 5 GB pipeline.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from huggingface_hub import model_info

from regft import realsize, shapes
from regft.cli import shorten
from regft.errors import UserError, WeightsUnavailable
from regft.hub import hub_reachable
from regft.tiny_diffusion import TINY_RESOLUTION, TINY_VARIANTS, materialize_tiny_pipeline

# diffusers is imported where a pipeline is located or loaded: it takes seconds, and the driver
# builds generators (shapes, identity checks) without ever loading one

PAPER_GENERATOR = "stabilityai/stable-diffusion-2-1-base"  # docs/method.md: SD 2.1-base
SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # the paper's SDXL
SDXL_RESOLUTION = 1024  # what SDXL is trained at (its UNet's sample_size 128 x VAE factor 8)
DTYPES = ("auto", "fp16", "bf16", "fp32")
# generators with a native size; a saved folder says its own (native_resolution); anything
# else is a real Stable Diffusion model, 512 px
NATIVE_RESOLUTION = {**{name: TINY_RESOLUTION for name in TINY_VARIANTS}, "shapes": shapes.RESOLUTION,
                     SDXL_BASE: SDXL_RESOLUTION}
DEFAULT_RESOLUTION = 512
# generators built into regft (no weights to locate or download)
BUILTIN_GENERATORS = (*TINY_VARIANTS, "shapes")
DEFAULT_SCHEDULER = "default"  # the scheduler the model ships with
# classifier-free guidance is on only for guidance_scale > 1 (diffusers' do_classifier_free_guidance)
CFG_THRESHOLD = 1.0
SCHEDULERS_LISTED = 6  # compatible schedulers named in a refusal
# what regft passes every pipeline call (per-image generators, numpy output, the size and steps)
REQUIRED_CALL_PARAMETERS = ("prompt", "height", "width", "num_inference_steps", "generator", "output_type")


@runtime_checkable
class ImageGenerator(Protocol):
    def identity(self) -> dict:
        """Everything that determines the pixels (model id, revision, settings)."""
        ...

    def generate(self, prompts: list[str], seeds: list[int], labels: list[int],
                 classnames: list[str]) -> list[np.ndarray]:
        """One uint8 (H, W, 3) image per item."""
        ...


def native_resolution(name: str) -> int:
    """The size a generator makes by default: its own, or for a saved pipeline folder what its
    configs say it was trained at (the UNet's sample_size in latents x the VAE factor)."""
    if name in NATIVE_RESOLUTION or not os.path.isdir(name):
        return NATIVE_RESOLUTION.get(name, DEFAULT_RESOLUTION)
    unet, vae = Path(name) / "unet" / "config.json", Path(name) / "vae" / "config.json"
    try:
        size = json.loads(unet.read_text(encoding="utf-8")).get("sample_size")
        factor = _vae_factor(json.loads(vae.read_text(encoding="utf-8")) if vae.is_file() else None)
    except (OSError, ValueError, AttributeError):  # no or unreadable UNet config: the SD default
        return DEFAULT_RESOLUTION
    return size * factor if isinstance(size, int) and size > 0 else DEFAULT_RESOLUTION


def resolve_torch_dtype(dtype: str, device: str):
    """'auto' = fp16 on CUDA (the paper's setting), fp32 on CPU (CPU fp16 is slow and lossy)."""
    if dtype not in DTYPES:
        raise UserError(f"dtype: unknown value {dtype!r}; choose from {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def folder_fingerprint(folder: str | Path) -> str:
    """A cheap content fingerprint of a pipeline folder: every config file's bytes plus every
    file's name and size (hashing multi-GB weights on each run would cost minutes)."""
    root = Path(folder)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue
        h.update(rel.encode() + b"\0" + str(p.stat().st_size).encode() + b"\0")
        if p.suffix in (".json", ".txt"):
            h.update(p.read_bytes())
    return "files-sha256:" + h.hexdigest()[:16]


def locate_diffusers_model(model: str, revision: str | None = None) -> tuple[str, str]:
    """Where to load `model` from, as (source, revision), without loading or downloading weights.

    - a folder with model_index.json: (folder, content fingerprint)
    - a hub id cached locally: (snapshot folder, commit hash)
    - a hub id not cached but the hub reachable: (model id, commit hash of `revision`)
    Raises WeightsUnavailable (one line) when the model is neither on disk nor reachable, and
    UserError for a folder that is not a diffusers pipeline.
    """
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            raise UserError(
                f"generator {model!r}: folder has no model_index.json; pass a folder written by "
                "DiffusionPipeline.save_pretrained, a Hugging Face model id, or 'tiny'"
            )
        return os.path.abspath(model), folder_fingerprint(model)
    from diffusers import DiffusionPipeline  # heavy: see the imports

    try:
        # diffusers' own resolver: returns the cached snapshot when every file from_pretrained
        # needs is present, raises otherwise. local_files_only: never a network call here.
        folder = DiffusionPipeline.download(model, revision=revision, local_files_only=True)
        return str(folder), Path(folder).name  # snapshots/<commit hash>
    except Exception:  # not cached (any of several hub/diffusers error types): try the hub
        pass
    if not hub_reachable():
        raise WeightsUnavailable(
            f"generator {model!r} is not in the Hugging Face cache and the hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1): download it once where there is network "
            f"(python -c \"from diffusers import DiffusionPipeline as P; P.download('{model}')\")"
            " and copy the cache (HF_HOME), pass a local pipeline folder, or use --generator tiny"
        )
    try:
        sha = model_info(model, revision=revision).sha
    except Exception as e:  # unknown repo, gated model, bad revision: one line, not a traceback
        raise UserError(f"generator {model!r}: cannot resolve it on the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return model, sha


# ------------------------------------------------------ what a pipeline takes -----

class GeneratorSettingsError(UserError):
    """Generation settings the model's pipeline cannot take. `settings` holds (GenerationConfig
    field, problem) pairs, so each command names the flag that sets the field."""

    def __init__(self, generator: str, settings: list[tuple[str, str]]):
        self.generator, self.settings = generator, list(settings)
        super().__init__([f"{name}: {problem}" for name, problem in self.settings])


@dataclass(frozen=True)
class PipelineFacts:
    """What a model's configs say about its pipeline, read without loading any weights."""

    pipeline: str  # the text-to-image class AutoPipelineForText2Image loads for it
    scheduler_class: str  # the scheduler the model ships with
    scheduler_config: dict  # its config file (keys starting with '_' dropped)
    vae_scale_factor: int  # pixels per latent: sizes must be multiples of it


def _public(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _vae_factor(vae_config: dict | None) -> int:
    # diffusers' own rule (pipelines' vae_scale_factor), 8 when the pipeline has no VAE config
    blocks = (vae_config or {}).get("block_out_channels")
    return 2 ** (len(blocks) - 1) if blocks else 8


def _facts(model: str, model_index: dict, scheduler: dict, vae: dict | None) -> PipelineFacts:
    name = model_index.get("_class_name", "?")
    cls = text2image_class(model, name)
    return PipelineFacts(cls.__name__, scheduler.get("_class_name", "?"), _public(scheduler),
                         _vae_factor(vae))


def folder_facts(model: str, folder: str | Path) -> PipelineFacts:
    """The facts of a saved pipeline folder (a local folder or a cached hub snapshot)."""
    root = Path(folder)

    def read(rel: str) -> dict | None:
        f = root / rel
        return json.loads(f.read_text(encoding="utf-8")) if f.is_file() else None

    return _facts(model, read("model_index.json") or {}, read("scheduler/scheduler_config.json") or {},
                  read("vae/config.json"))


def hub_facts(model: str, revision: str) -> PipelineFacts:
    """The facts of a hub model at `revision`, from its three small config files."""
    from huggingface_hub import hf_hub_download

    def read(rel: str) -> dict | None:
        try:
            return json.loads(Path(hf_hub_download(model, rel, revision=revision)).read_text())
        except Exception:  # a pipeline without that component (any of several hub error types)
            return None

    return _facts(model, read("model_index.json") or {}, read("scheduler/scheduler_config.json") or {},
                  read("vae/config.json"))


def random_facts(model: str) -> PipelineFacts:
    """The facts of a shipped architecture (--weights random): realsize builds an SD pipeline."""
    return _facts(model, {"_class_name": "StableDiffusionPipeline"},
                  realsize.component_config(model, "scheduler"), realsize.component_config(model, "vae"))


def text2image_class(model: str, class_name: str):
    """The class AutoPipelineForText2Image.from_pretrained loads for a model_index `_class_name`
    (its own lookup, so the identity names the class that really runs)."""
    from diffusers.pipelines.auto_pipeline import (  # heavy: see the imports
        AUTO_TEXT2IMAGE_PIPELINES_MAPPING,
        _get_task_class,
    )

    cls = _get_task_class(AUTO_TEXT2IMAGE_PIPELINES_MAPPING, class_name, throw_error_if_not_exist=False)
    if cls is None:
        raise UserError(f"generator {shorten(model)}: its pipeline {shorten(class_name)} is not one "
                        "diffusers' AutoPipelineForText2Image loads for text-to-image; pass a "
                        "text-to-image model (SD 1.5 / 2.1, SDXL, SD-Turbo, ...) or --generator tiny")
    return cls


def scheduler_class(name: str):
    """The diffusers scheduler class called `name`, or None."""
    import diffusers  # heavy: see the imports
    from diffusers import SchedulerMixin

    try:
        cls = getattr(diffusers, name, None)
    except Exception:  # a lazily imported scheduler whose optional dependency is missing
        return None
    return cls if isinstance(cls, type) and issubclass(cls, SchedulerMixin) else None


def resolve_scheduler(name: str, facts: PipelineFacts) -> tuple[str | None, dict | None, str | None]:
    """(class name, the config it runs with, problem): `default` is the model's own scheduler;
    another name must be a diffusers scheduler its pipeline can use (the model scheduler's
    `compatibles`), built from the model's config as `X.from_config(pipe.scheduler.config)` is."""
    own = scheduler_class(facts.scheduler_class)
    if own is None:
        return None, None, (f"the model's own scheduler {shorten(facts.scheduler_class)} is not a "
                            "diffusers scheduler class this diffusers knows")
    base = dict(own.from_config(facts.scheduler_config).config)
    if name == DEFAULT_SCHEDULER:
        return own.__name__, _public(base), None
    compatible = sorted({c.__name__ for c in own().compatibles} | {own.__name__})
    more = " ..." if len(compatible) > SCHEDULERS_LISTED else ""
    listed = ", ".join(compatible[:SCHEDULERS_LISTED]) + more
    cls = scheduler_class(name)
    if cls is None:
        return None, None, (f"{shorten(name)} is not a diffusers scheduler class; give "
                            f"{DEFAULT_SCHEDULER} or a class name such as {listed}")
    if cls.__name__ not in compatible:
        return None, None, (f"{cls.__name__} does not work with {facts.pipeline} (whose scheduler "
                            f"is {own.__name__}); use one of {listed}")
    return cls.__name__, _public(dict(cls.from_config(base).config)), None


def _call_parameters(pipeline: str) -> set[str]:
    import diffusers  # heavy: see the imports

    return set(inspect.signature(getattr(diffusers, pipeline).__call__).parameters)


def _init_parameters(pipeline: str) -> set[str]:
    import diffusers  # heavy: see the imports

    return set(inspect.signature(getattr(diffusers, pipeline).__init__).parameters)


def setting_problems(facts: PipelineFacts, resolution: int, guidance: float,
                     negative_prompt: str | None, scheduler_problem: str | None) -> list[tuple[str, str]]:
    """(field, problem) for every setting the pipeline cannot take."""
    params = _call_parameters(facts.pipeline)
    problems = []
    missing = [p for p in REQUIRED_CALL_PARAMETERS if p not in params]
    if missing:
        problems.append(("generator", f"{facts.pipeline} takes no {', '.join(missing)}: regft cannot "
                         "drive it (it passes each image's seed, size and steps)"))
    if scheduler_problem:
        problems.append(("scheduler", scheduler_problem))
    if resolution % facts.vae_scale_factor:
        f = facts.vae_scale_factor
        problems.append(("resolution", f"must be a multiple of {f} for {facts.pipeline} (its VAE "
                         f"downsamples by {f}), got {resolution}; e.g. {max(f, round(resolution / f) * f)}"))
    if "guidance_scale" not in params and guidance > CFG_THRESHOLD:
        problems.append(("guidance", f"{facts.pipeline} has no classifier-free guidance; give "
                         f"{CFG_THRESHOLD:g} or less (e.g. 0), got {guidance:g}"))
    if negative_prompt and "negative_prompt" not in params:
        problems.append(("generator_options", f"{facts.pipeline} takes no negative_prompt; drop it"))
    return problems


# ---------------------------------------------------------------- the generator -----

class DiffusersGenerator:
    """A diffusers text-to-image pipeline (AutoPipelineForText2Image) with per-image seeds;
    weights load lazily on first generate."""

    def __init__(self, model: str, *, resolution: int, steps: int, guidance: float,
                 device: str = "cpu", dtype: str = "auto", revision: str | None = None,
                 display_name: str | None = None, source: str | None = None,
                 negative_prompt: str | None = None, weights: str = realsize.PRETRAINED,
                 scheduler: str = DEFAULT_SCHEDULER, facts: PipelineFacts | None = None):
        problems = []
        if resolution <= 0 or resolution % 8:
            problems.append(f"resolution must be a positive multiple of 8 (the VAE downsamples by "
                            f"8), got {resolution}")
        if steps <= 0:
            problems.append(f"steps must be >= 1, got {steps}")
        if dtype not in DTYPES:
            problems.append(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if problems:
            raise UserError(f"generator {model!r}: " + "; ".join(problems))
        self.model = model
        self.resolution, self.steps, self.guidance = int(resolution), int(steps), float(guidance)
        self.device, self.dtype = device, dtype
        self.negative_prompt = negative_prompt
        self.weights = weights
        if weights == realsize.RANDOM:  # built from the shipped configs: nothing to locate
            source, revision = model, realsize.RANDOM_REVISION
            facts = facts or random_facts(model)
        elif source is None:
            source, revision = locate_diffusers_model(model, revision)
        if facts is None:
            facts = folder_facts(model, source) if os.path.isdir(source) else hub_facts(source, revision)
        self.source, self.revision, self.facts = source, revision, facts
        self.display_name = display_name or model
        self.scheduler_name, self.scheduler_config, problem = resolve_scheduler(scheduler, facts)
        refused = setting_problems(facts, self.resolution, self.guidance, negative_prompt, problem)
        if refused:
            raise GeneratorSettingsError(self.display_name, refused)
        self._pipe = None

    def identity(self) -> dict:
        # dtype is the requested precision policy ('auto' = fp16 on GPU, fp32 on CPU), not the
        # device: the dataset id must not change with where it is generated or read.
        return {
            "generator": "diffusers",
            "pipeline": self.facts.pipeline,
            "model": self.display_name,
            "revision": self.revision,
            "resolution": self.resolution,
            "steps": self.steps,
            "guidance": self.guidance,
            "dtype": self.dtype,
            "negative_prompt": self.negative_prompt,
            "scheduler": {"class": self.scheduler_name, "config": self.scheduler_config},
            # only when random, so the ids of datasets made with real weights stay the same
            **({"weights": self.weights} if self.weights == realsize.RANDOM else {}),
        }

    def runtime(self) -> dict:
        """Where the pixels were actually computed (recorded in the manifest, not hashed)."""
        return {"device": str(self.device), "torch_dtype": str(resolve_torch_dtype(self.dtype, self.device))}

    def load(self):
        if self._pipe is None:
            torch_dtype = resolve_torch_dtype(self.dtype, self.device)
            if self.weights == realsize.RANDOM:
                pipe = realsize.build_sd_pipeline(self.model, dtype=torch_dtype)
            else:
                pipe = self._from_pretrained(torch_dtype)
            if type(pipe).__name__ != self.facts.pipeline:  # the identity would name another class
                raise RuntimeError(f"generator {self.display_name!r}: loaded {type(pipe).__name__}, "
                                   f"expected {self.facts.pipeline}")
            # the scheduler the identity names, from the config it records
            pipe.scheduler = scheduler_class(self.scheduler_name).from_config(self.scheduler_config)
            self._pipe = self._finish(pipe)
        return self._pipe

    def _from_pretrained(self, torch_dtype):
        from diffusers import AutoPipelineForText2Image  # heavy: see the imports

        accepted = _init_parameters(self.facts.pipeline)
        extra = {}
        if "safety_checker" in accepted:  # docs/method.md: safety checker off
            extra.update(safety_checker=None, requires_safety_checker=False)
        if "add_watermarker" in accepted:
            # SDXL watermarks its images when the invisible-watermark package happens to be
            # installed: pixels would depend on the machine's packages
            extra["add_watermarker"] = False
        local = os.path.isdir(self.source)
        return AutoPipelineForText2Image.from_pretrained(
            self.source, revision=None if local else self.revision, dtype=torch_dtype,
            local_files_only=local, **extra)

    def _finish(self, pipe):
        pipe.set_progress_bar_config(disable=True)
        # decode one image at a time: SD 2.1-base's VAE decoding a batch of 8 at 512 px in fp32
        # holds ~1 GB per activation and took the CPU actor past 10 GB (killed by Ray's OOM
        # monitor); per image it needs an eighth of that, and a decode is per-sample anyway
        pipe.vae.enable_slicing()
        return pipe.to(self.device)

    def _call_kwargs(self, n: int) -> dict:
        """The settings as this pipeline takes them (setting_problems refused the rest)."""
        params = _call_parameters(self.facts.pipeline)
        kwargs = {"height": self.resolution, "width": self.resolution,
                  "num_inference_steps": self.steps}
        if "guidance_scale" in params:
            kwargs["guidance_scale"] = self.guidance
        if self.negative_prompt:
            kwargs["negative_prompt"] = [self.negative_prompt] * n
        return kwargs

    def generate(self, prompts: list[str], seeds: list[int], labels: list[int],
                 classnames: list[str]) -> list[np.ndarray]:
        n = len(prompts)
        if not (len(seeds) == len(labels) == len(classnames) == n):
            raise ValueError(f"generate: prompts, seeds, labels, classnames differ in length "
                             f"({n}, {len(seeds)}, {len(labels)}, {len(classnames)})")
        if n == 0:
            return []
        pipe = self.load()
        # one CPU generator per image: the latents of image i depend on seeds[i] only
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        with torch.inference_mode():
            out = pipe(prompt=list(prompts), generator=generators, output_type="np",
                       **self._call_kwargs(n)).images  # (n, H, W, 3) float in [0, 1]
        # same rounding as diffusers' numpy_to_pil
        images = (np.asarray(out, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
        return [images[i] for i in range(n)]


def make_generator(name: str, *, resolution: int, steps: int, guidance: float,
                   device: str = "cpu", dtype: str = "auto", scheduler: str = DEFAULT_SCHEDULER,
                   options: dict | None = None) -> ImageGenerator:
    """The generator called `name` (see module docstring). `options` go to the generator:
    shapes takes `gap`; diffusers models take `revision` and `negative_prompt`. `scheduler`:
    `default` or a diffusers scheduler class name (diffusers generators only)."""
    options = dict(options or {})
    weights = options.pop("weights", realsize.PRETRAINED)
    if weights not in (realsize.PRETRAINED, realsize.RANDOM):
        raise UserError(f"generator {name!r}: weights must be {realsize.PRETRAINED} or "
                        f"{realsize.RANDOM}, got {weights!r}")
    if name == "shapes":  # procedural, and tiny is random already: `weights` changes neither
        if scheduler != DEFAULT_SCHEDULER:
            raise GeneratorSettingsError(name, [("scheduler", "the shapes generator has no "
                                                 f"scheduler; give {DEFAULT_SCHEDULER}")])
        return shapes.ShapesGenerator(resolution=resolution, **options)
    allowed = {"revision", "negative_prompt"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"generator {name!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    common = dict(resolution=resolution, steps=steps, guidance=guidance, device=device, dtype=dtype,
                  scheduler=scheduler, negative_prompt=options.get("negative_prompt"))
    if name in TINY_VARIANTS:
        if options.get("revision"):
            raise UserError(f"generator {name!r}: takes no revision (it is built from code)")
        folder = materialize_tiny_pipeline(variant=name)
        # the folder lives in a per-machine cache; the code version identifies the weights
        return DiffusersGenerator(str(folder), display_name=name, source=str(folder),
                                  revision=TINY_VARIANTS[name], **common)
    if weights == realsize.RANDOM:
        if not realsize.has_architecture(name):
            raise UserError(f"generator {name!r}: --weights random builds only the architectures "
                            f"shipped in regft ({', '.join(realsize.ARCHITECTURES)}) or tiny")
        return DiffusersGenerator(name, weights=weights, **common)
    display = name
    if os.path.isdir(name):
        # a local folder is named by its last component; its content fingerprint is the revision
        display = "dir:" + Path(name).resolve().name
    return DiffusersGenerator(name, revision=options.get("revision"), display_name=display, **common)
