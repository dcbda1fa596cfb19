"""Text-to-image generators behind one small protocol (assembly ring: single process, no Ray).

`make_generator(name, ...)` returns an `ImageGenerator`:
- `tiny`: the offline tiny Stable Diffusion pipeline (regft.tiny_diffusion), materialised once
  under REGFT_CACHE and loaded with `from_pretrained(..., local_files_only=True)`.
- `shapes`: the procedural testbed (`regft.shapes.ShapesGenerator`), pure numpy.
- anything else: a diffusers model id (e.g. stabilityai/stable-diffusion-2-1-base) or a folder
  saved with `save_pretrained`, loaded with `StableDiffusionPipeline.from_pretrained`.
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
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from huggingface_hub import model_info

from regft import realsize, shapes
from regft.errors import UserError, WeightsUnavailable
from regft.hub import hub_reachable
from regft.tiny_diffusion import TINY_RESOLUTION, TINY_SD_VERSION, materialize_tiny_pipeline

# diffusers is imported where a pipeline is located or loaded: it takes seconds, and the driver
# builds generators (shapes, identity checks) without ever loading one

PAPER_GENERATOR = "stabilityai/stable-diffusion-2-1-base"  # docs/method.md: SD 2.1-base
DTYPES = ("auto", "fp16", "bf16", "fp32")
# generators with a native size; anything else is a real Stable Diffusion model, 512 px
NATIVE_RESOLUTION = {"tiny": TINY_RESOLUTION, "shapes": shapes.RESOLUTION}
DEFAULT_RESOLUTION = 512


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
    return NATIVE_RESOLUTION.get(name, DEFAULT_RESOLUTION)


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
    from diffusers import StableDiffusionPipeline  # heavy: see the imports

    try:
        # diffusers' own resolver: returns the cached snapshot when every file from_pretrained
        # needs is present, raises otherwise. local_files_only: never a network call here.
        folder = StableDiffusionPipeline.download(model, revision=revision, local_files_only=True)
        return str(folder), Path(folder).name  # snapshots/<commit hash>
    except Exception:  # not cached (any of several hub/diffusers error types): try the hub
        pass
    if not hub_reachable():
        raise WeightsUnavailable(
            f"generator {model!r} is not in the Hugging Face cache and the hub cannot be reached "
            "(offline or HF_HUB_OFFLINE=1): download it once where there is network "
            f"(python -c \"from diffusers import StableDiffusionPipeline as P; P.download('{model}')\")"
            " and copy the cache (HF_HOME), pass a local pipeline folder, or use --generator tiny"
        )
    try:
        sha = model_info(model, revision=revision).sha
    except Exception as e:  # unknown repo, gated model, bad revision: one line, not a traceback
        raise UserError(f"generator {model!r}: cannot resolve it on the hub ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return model, sha


class DiffusersGenerator:
    """A StableDiffusionPipeline with per-image seeds; weights load lazily on first generate."""

    def __init__(self, model: str, *, resolution: int, steps: int, guidance: float,
                 device: str = "cpu", dtype: str = "auto", revision: str | None = None,
                 display_name: str | None = None, source: str | None = None,
                 negative_prompt: str | None = None, weights: str = realsize.PRETRAINED):
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
        elif source is None:
            source, revision = locate_diffusers_model(model, revision)
        self.source, self.revision = source, revision
        self.display_name = display_name or model
        self._pipe = None

    def identity(self) -> dict:
        # dtype is the requested precision policy ('auto' = fp16 on GPU, fp32 on CPU), not the
        # device: the dataset id must not change with where it is generated or read.
        return {
            "generator": "diffusers",
            "pipeline": "StableDiffusionPipeline",
            "model": self.display_name,
            "revision": self.revision,
            "resolution": self.resolution,
            "steps": self.steps,
            "guidance": self.guidance,
            "dtype": self.dtype,
            "negative_prompt": self.negative_prompt,
            "scheduler": "model default",
            # only when random, so the ids of datasets made with real weights stay the same
            **({"weights": self.weights} if self.weights == realsize.RANDOM else {}),
        }

    def runtime(self) -> dict:
        """Where the pixels were actually computed (recorded in the manifest, not hashed)."""
        return {"device": str(self.device), "torch_dtype": str(resolve_torch_dtype(self.dtype, self.device))}

    def load(self):
        if self._pipe is None:
            from diffusers import StableDiffusionPipeline  # heavy: see the imports

            torch_dtype = resolve_torch_dtype(self.dtype, self.device)
            if self.weights == realsize.RANDOM:
                self._pipe = self._finish(realsize.build_sd_pipeline(self.model, dtype=torch_dtype))
                return self._pipe
            local = os.path.isdir(self.source)
            pipe = StableDiffusionPipeline.from_pretrained(
                self.source,
                revision=None if local else self.revision,
                dtype=torch_dtype,
                safety_checker=None,  # docs/method.md: safety checker off
                requires_safety_checker=False,
                local_files_only=local,
            )
            self._pipe = self._finish(pipe)
        return self._pipe

    def _finish(self, pipe):
        pipe.set_progress_bar_config(disable=True)
        # decode one image at a time: SD 2.1-base's VAE decoding a batch of 8 at 512 px in fp32
        # holds ~1 GB per activation and took the CPU actor past 10 GB (killed by Ray's OOM
        # monitor); per image it needs an eighth of that, and a decode is per-sample anyway
        pipe.vae.enable_slicing()
        return pipe.to(self.device)

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
            out = pipe(
                prompt=list(prompts),
                negative_prompt=[self.negative_prompt] * n if self.negative_prompt else None,
                height=self.resolution,
                width=self.resolution,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                generator=generators,
                output_type="np",
            ).images  # (n, H, W, 3) float in [0, 1]
        # same rounding as diffusers' numpy_to_pil
        images = (np.asarray(out, dtype=np.float32) * 255).round().clip(0, 255).astype(np.uint8)
        return [images[i] for i in range(n)]


def make_generator(name: str, *, resolution: int, steps: int, guidance: float,
                   device: str = "cpu", dtype: str = "auto",
                   options: dict | None = None) -> ImageGenerator:
    """The generator called `name` (see module docstring). `options` go to the generator:
    shapes takes `gap`; diffusers models take `revision` and `negative_prompt`."""
    options = dict(options or {})
    weights = options.pop("weights", realsize.PRETRAINED)
    if weights not in (realsize.PRETRAINED, realsize.RANDOM):
        raise UserError(f"generator {name!r}: weights must be {realsize.PRETRAINED} or "
                        f"{realsize.RANDOM}, got {weights!r}")
    if name == "shapes":  # procedural, and tiny is random already: `weights` changes neither
        return shapes.ShapesGenerator(resolution=resolution, **options)
    allowed = {"revision", "negative_prompt"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise UserError(f"generator {name!r}: unknown option(s) {unknown}; allowed: {sorted(allowed)}")
    if name == "tiny":
        if options.get("revision"):
            raise UserError("generator 'tiny': takes no revision (it is built from code)")
        folder = materialize_tiny_pipeline()
        # the folder lives in a per-machine cache; the code version identifies the weights
        return DiffusersGenerator(
            str(folder), resolution=resolution, steps=steps, guidance=guidance, device=device,
            dtype=dtype, display_name="tiny", source=str(folder), revision=TINY_SD_VERSION,
            negative_prompt=options.get("negative_prompt"),
        )
    if weights == realsize.RANDOM:
        if not realsize.has_architecture(name):
            raise UserError(f"generator {name!r}: --weights random builds only the architectures "
                            f"shipped in regft ({', '.join(realsize.ARCHITECTURES)}) or tiny")
        return DiffusersGenerator(name, resolution=resolution, steps=steps, guidance=guidance,
                                  device=device, dtype=dtype, weights=weights,
                                  negative_prompt=options.get("negative_prompt"))
    display = name
    if os.path.isdir(name):
        # a local folder is named by its last component; its content fingerprint is the revision
        display = "dir:" + Path(name).resolve().name
    return DiffusersGenerator(
        name, resolution=resolution, steps=steps, guidance=guidance, device=device, dtype=dtype,
        revision=options.get("revision"), display_name=display,
        negative_prompt=options.get("negative_prompt"),
    )

