"""The searched model as one self-contained artifact: `model.safetensors` + `regft_model.json`.

    folder/model.safetensors   the ensembled ImageClassifier's state dict (visual.*, head.linear.*)
    folder/regft_model.json    architecture (open_clip model_cfg + preprocess_cfg), class names in
                               label order, alpha, dataset id, MLflow run, metrics, sha256 of the
                               weights file

Loading (`load_export`) reads JSON and safetensors only (no pickle, no code from the folder),
checks the JSON's fields, the weights' sha256, and that every tensor has the shape the recorded
architecture needs (class count = head rows, embedding size = head columns); anything else is
refused with an `ExportError` naming the file, the mismatch and the fix. The architecture is
rebuilt with open_clip from the recorded config (no pretrained weights are fetched), so an export
loads on a machine that never saw the training run or its `local-dir:` model folder.

Assembly ring: torch/open_clip/safetensors and file I/O; no Ray, no MLflow (regft.registry wraps
this for the Model Registry).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from regft import checkpoint
from regft.cli import shorten
from regft.engine import normalize_uint8, split_clip_transform
from regft.errors import ExportError
from regft.images import as_pil
from regft.models import TINY_ALIASES, TINY_NAME, create_clip, register_tiny_config
from regft.zeroshot import ClassificationHead, ImageClassifier

FORMAT = "regft.export/1"
WEIGHTS_FILE = "model.safetensors"
META_FILE = "regft_model.json"
HEAD_WEIGHT, HEAD_BIAS = "head.linear.weight", "head.linear.bias"
REQUIRED = {  # key -> accepted JSON types
    "format": (str,), "weights": (str,), "weights_sha256": (str,), "model": (str,),
    "open_clip": (dict,), "classnames": (list,), "num_classes": (int,), "embed_dim": (int,),
    "alpha": (int, float),
}


# -------------------------------------------------------------- optional sections ----
@dataclass(frozen=True, kw_only=True)
class TaskSection:
    """`task`: the task the export was trained for, enough to re-evaluate it (regft.evaluate)."""

    name: str | None = None
    real_test: str | None = None  # its real test split: a path, or tasks.SHAPES_REAL
    generation_classnames: list[str] = field(default_factory=list)  # the generator's prompts' names


@dataclass(frozen=True, kw_only=True)
class EvaluationSection:
    """`evaluation`: how the logged real-test number was computed."""

    real_test: str | None = None
    eval_batch_size: int | None = None
    device: str | None = None


@dataclass(frozen=True, kw_only=True)
class MlflowSection:
    """`mlflow`: where the export was logged and registered."""

    run_id: str | None = None
    registered_name: str | None = None
    experiment_id: str | None = None


SECTIONS = {"task": TaskSection, "evaluation": EvaluationSection, "mlflow": MlflowSection}
Section = TaskSection | EvaluationSection | MlflowSection


def _as_section(name: str, value: Section | dict | None, where: str) -> Section:
    cls = SECTIONS[name]
    if isinstance(value, cls):
        return value
    if value is not None and not isinstance(value, dict):
        raise ExportError(f"{where}: section {name!r} must be an object, got {type(value).__name__}")
    data = value or {}  # absent or empty: nothing recorded (an export made outside a search)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ExportError(f"{where}: section {name!r} has unknown keys {shorten(unknown)} (known: "
                          f"{', '.join(known)})")
    wrong = [f"{name}.{f.name} is {shorten(data[f.name])}, expected {f.type}"
             for f in dataclasses.fields(cls) if f.name in data and not _fits(data[f.name], f.type)]
    if wrong:
        raise ExportError(f"{where}: " + "; ".join(wrong))
    return cls(**data)


def _fits(value, annotation: str) -> bool:
    """Whether a JSON value has a section field's type ("str | None", "int | None", "list[str]")."""
    if value is None:
        return annotation.endswith("| None")
    if annotation.startswith("int"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if annotation.startswith("list"):
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, str)


def section(meta: dict, name: str) -> Section:
    """The typed optional section `name` ("task", "evaluation" or "mlflow") of an export's JSON
    (`read_meta`); fields that were not recorded are None (empty for lists)."""
    return _as_section(name, meta.get(name), META_FILE)


# ------------------------------------------------------------------- architecture ----
def _base_model_cfg(model_name: str) -> dict:
    """open_clip's model config for a regft model name (catalog name, `tiny`, `local-dir:`)."""
    import open_clip  # heavy (seconds): imported where an architecture is read or built

    if model_name.startswith("local-dir:"):
        path = Path(model_name[len("local-dir:"):]) / "open_clip_config.json"
        return json.loads(path.read_text(encoding="utf-8"))["model_cfg"]
    register_tiny_config()
    name = TINY_NAME if model_name in TINY_ALIASES else model_name
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ExportError(f"model {model_name!r}: no open_clip config to record; exports support "
                          "open_clip model names, 'tiny' and 'local-dir:' folders")
    return cfg


def architecture_of(bundle) -> dict:
    """{"model_cfg", "preprocess_cfg"}: what open_clip needs to rebuild `bundle`'s model without
    its pretrained weights. The activation is read off the built model (OpenAI weights force
    QuickGELU), the preprocessing off open_clip's final per-model config."""
    from open_clip.model import get_model_preprocess_cfg  # heavy: see _base_model_cfg
    from open_clip.transformer import QuickGELU

    cfg = json.loads(json.dumps(_base_model_cfg(bundle.model_name)))  # a deep, JSON-able copy
    cfg["quick_gelu"] = any(isinstance(m, QuickGELU) for m in bundle.model.modules())
    pp = json.loads(json.dumps(get_model_preprocess_cfg(bundle.model)))
    return {"model_cfg": cfg, "preprocess_cfg": pp}


def architecture_or_none(bundle) -> dict | None:
    """`architecture_of`, or None where it cannot be recorded (training goes on regardless;
    exporting such a run rebuilds the model once to read it)."""
    try:
        return architecture_of(bundle)
    except (ExportError, OSError, ValueError, KeyError):
        return None


def _build_architecture(arch: dict, num_classes: int, embed_dim: int, device: str = "cpu"):
    """(ImageClassifier with zero weights, eval SplitTransform) from a recorded architecture.
    `device="meta"` builds it without memory (shapes only: what load_export checks first)."""
    import open_clip  # heavy: see _base_model_cfg

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: by design
    try:
        with tempfile.TemporaryDirectory(prefix="regft-arch-") as d, torch.device(device):
            Path(d, "open_clip_config.json").write_text(json.dumps(
                {"model_cfg": arch["model_cfg"], "preprocess_cfg": arch.get("preprocess_cfg", {})}))
            model, _, preprocess_eval = open_clip.create_model_and_transforms(
                f"local-dir:{d}", load_weights=False, device=device)
            head = ClassificationHead(torch.zeros(num_classes, embed_dim))
    finally:
        logging.disable(previous)
    params = sum(p.numel() for p in model.parameters())
    return ImageClassifier(model, head).eval(), split_clip_transform(preprocess_eval), params


# the most parameters a recorded architecture may build (text tower included, which is built
# and dropped): the largest open_clip models have about 5 billion; more is a corrupt JSON
MAX_PARAMS = 10_000_000_000
ARCH_INT_MAX = 1_000_000  # any one integer of an architecture (widths, layers, vocabulary)
IMAGE_SIDE_MAX = 4096  # pixels: the preprocessing's input size
CHANNELS = 3  # RGB: the preprocessing's mean and std


def _numbers(value, path: str):
    """(path, number) for every number in a JSON value (bools excluded)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def architecture_problems(arch: dict) -> list[str]:
    """What is wrong with an export's `open_clip` section before anything is built from it:
    the sections' types, numbers that are not finite or absurdly large, and the
    preprocessing's size, mean and std."""
    cfg = arch.get("model_cfg")
    if not isinstance(cfg, dict):
        return [f"open_clip.model_cfg is {type(cfg).__name__}, expected an object"]
    problems = [f"open_clip.model_cfg.{k} is {type(cfg.get(k)).__name__}, expected an object"
                for k in ("vision_cfg", "text_cfg") if not isinstance(cfg.get(k), dict)]
    embed = cfg.get("embed_dim")
    if isinstance(embed, bool) or not isinstance(embed, int) or embed < 1:
        problems.append(f"open_clip.model_cfg.embed_dim is {shorten(embed)}, expected an integer >= 1")
    pp = arch.get("preprocess_cfg", {})
    if not isinstance(pp, dict):
        return problems + [f"open_clip.preprocess_cfg is {type(pp).__name__}, expected an object"]
    for path, v in _numbers({"model_cfg": cfg, "preprocess_cfg": pp}, "open_clip"):
        if not math.isfinite(v) or abs(v) > ARCH_INT_MAX:  # negatives exist: init_logit_bias
            problems.append(f"{path} is {shorten(v)}: not a plausible architecture value")
    size = pp.get("size")
    sides = size if isinstance(size, list) else [size] if size is not None else []
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= IMAGE_SIDE_MAX
               for x in sides) or len(sides) > 2:
        problems.append(f"open_clip.preprocess_cfg.size is {shorten(size)}, expected 1..."
                        f"{IMAGE_SIDE_MAX} pixels or [height, width]")
    for key in ("mean", "std"):
        v = pp.get(key)
        if v is not None and not (isinstance(v, list) and len(v) == CHANNELS and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                and (key == "mean" or x > 0) for x in v)):
            problems.append(f"open_clip.preprocess_cfg.{key} is {shorten(v)}, expected "
                            f"{CHANNELS} finite numbers{' > 0' if key == 'std' else ''}")
    return problems[:LISTED]


LISTED = 5  # problems of one export's JSON reported at once


# ------------------------------------------------------------------------- writing ----
def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clean_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        out[str(k)] = float(v) if math.isfinite(v) else None
    return out


def write_export(folder: str | Path, state_dict: dict[str, torch.Tensor], *, model: str,
                 pretrained: str | None, architecture: dict, classnames: Sequence[str], alpha: float,
                 task: TaskSection | dict | None = None, dataset_id: str | None = None,
                 mlflow: MlflowSection | dict | None = None, metrics: dict | None = None,
                 evaluation: EvaluationSection | dict | None = None,
                 extra: dict | None = None) -> Path:
    """Write `folder/model.safetensors` + `folder/regft_model.json` and return the folder.

    `state_dict`: an ImageClassifier's (visual.* + head.linear.*). `architecture`:
    `architecture_of(bundle)`. `task`, `evaluation`, `mlflow`: the optional sections (a
    section dataclass, or a dict of its fields). The folder is written complete or not at all
    (temp name, then renamed).
    """
    sections = {name: dataclasses.asdict(_as_section(name, value, "write_export"))
                for name, value in (("task", task), ("mlflow", mlflow), ("evaluation", evaluation))}
    classnames = [str(c) for c in classnames]
    if HEAD_WEIGHT not in state_dict:
        raise ExportError(f"state dict has no {HEAD_WEIGHT!r}: not an ImageClassifier's weights")
    rows, dim = state_dict[HEAD_WEIGHT].shape
    if rows != len(classnames):
        raise ExportError(f"the head has {rows} classes but {len(classnames)} class names were given")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ExportError(f"alpha must be in [0, 1], got {alpha}")
    folder = Path(folder)
    if (folder / META_FILE).exists():
        raise ExportError(f"{folder}: already holds an export; choose another folder or delete it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        meta = {
            "format": FORMAT,
            "weights": WEIGHTS_FILE,
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
            "model": model,
            "pretrained": pretrained,
            # what the fine-tune started from: None above = a random init (--weights random)
            "initial_weights": "pretrained" if pretrained else "random",
            "open_clip": architecture,
            "num_classes": len(classnames),
            "embed_dim": int(dim),
            "classnames": classnames,
            "head": {"normalize": True},  # logits = W @ normalize(features) + b
            "alpha": float(alpha),
            "task": sections["task"],
            "dataset_id": dataset_id,
            "mlflow": sections["mlflow"],
            "metrics": _clean_metrics(metrics or {}),
            "evaluation": sections["evaluation"],
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(extra or {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        if folder.exists():
            folder.rmdir()  # an empty folder only (checked above that it holds no export)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def export_checkpoint(checkpoint_dir: str | Path, folder: str | Path, **kwargs) -> Path:
    """Export a regft.train checkpoint folder (model.pt + meta.json; the final one holds the
    ensemble at the selected alpha). kwargs override/extend what the checkpoint's meta gives."""
    state, meta = checkpoint.load(str(checkpoint_dir))  # weights_only torch.load: no code
    if not meta.final:
        raise ExportError(f"{checkpoint_dir}: not a final (ensembled) checkpoint: epoch "
                          f"{meta.epoch} of a run that has not finished")
    arch = kwargs.pop("architecture", None) or meta.architecture
    if arch is None:  # checkpoints written before the architecture was recorded
        arch = architecture_of(create_clip(meta.model, meta.pretrained))
    metrics = {**meta.metrics.to_dict(), **kwargs.pop("metrics", {})}
    extra = {"best_epoch": meta.metrics.best_epoch, **kwargs.pop("extra", {})}
    args = {"model": meta.model, "pretrained": meta.pretrained, "classnames": meta.classnames,
            "alpha": meta.alpha, "task": TaskSection(name=meta.task), **kwargs}
    return write_export(folder, state, architecture=arch, metrics=metrics, extra=extra, **args)


# ------------------------------------------------------------------------- loading ----
def read_meta(folder: str | Path) -> dict:
    """The export's JSON, with every required field present and of the right type."""
    folder = Path(folder)
    path = folder / META_FILE
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such export folder")
    if not path.is_file():
        raise ExportError(f"{folder}: no {META_FILE}; not a regft export (python -m regft.tune "
                          "writes one for the best configuration)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ExportError(f"{path}: expected a JSON object")
    problems = []
    for key, types in REQUIRED.items():
        if key not in meta:
            problems.append(f"missing {key!r}")
        elif isinstance(meta[key], bool) or not isinstance(meta[key], types):
            problems.append(f"{key!r} is {type(meta[key]).__name__}, expected "
                            + " or ".join(t.__name__ for t in types))
    if problems:
        raise ExportError(f"{path}: " + "; ".join(problems))
    if meta["format"] != FORMAT:
        raise ExportError(f"{path}: format {meta['format']!r}, this regft reads {FORMAT!r}")
    if os.path.basename(meta["weights"]) != meta["weights"]:
        raise ExportError(f"{path}: weights {meta['weights']!r} must be a file name in the folder")
    if "model_cfg" not in meta["open_clip"]:
        raise ExportError(f"{path}: open_clip.model_cfg is missing")
    problems = architecture_problems(meta["open_clip"])
    names = meta["classnames"]
    if not all(isinstance(c, str) for c in names) or len(set(names)) != len(names):
        problems.append("classnames must be distinct strings")
    if not (math.isfinite(meta["alpha"]) and 0.0 <= meta["alpha"] <= 1.0):
        problems.append(f"alpha is {shorten(meta['alpha'])}, expected a number in [0, 1]")
    if meta["num_classes"] < 2 or meta["embed_dim"] < 1:
        problems.append(f"num_classes {meta['num_classes']} / embed_dim {meta['embed_dim']}: "
                        "expected >= 2 classes and an embedding size >= 1")
    if problems:
        raise ExportError(f"{path}: " + "; ".join(problems) + "; refusing to load it (re-export it)")
    for name in SECTIONS:
        _as_section(name, meta.get(name), str(path))  # refused here, not when first read
    return meta


def verify_export(folder: str | Path) -> dict:
    """Check the JSON, the weights' checksum and every tensor shape; return the JSON.
    Reads the safetensors header and bytes only."""
    folder = Path(folder)
    meta = read_meta(folder)
    weights = folder / meta["weights"]
    if not weights.is_file():
        raise ExportError(f"{folder}: weights file {meta['weights']} is missing")
    digest = sha256_file(weights)
    if digest != meta["weights_sha256"]:
        raise ExportError(f"{weights}: sha256 {digest[:12]}... does not match the recorded "
                          f"{meta['weights_sha256'][:12]}...: the file was changed or corrupted "
                          "after export; refusing to load it (re-download or re-export)")
    problems = []
    n, dim = meta["num_classes"], meta["embed_dim"]
    if len(meta["classnames"]) != n:
        problems.append(f"{len(meta['classnames'])} class names but num_classes {n}")
    cfg_dim = meta["open_clip"]["model_cfg"].get("embed_dim")
    if cfg_dim is not None and cfg_dim != dim:
        problems.append(f"embed_dim {dim} but the architecture's embed_dim is {cfg_dim}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # a safetensors parse error (the header is plain JSON + raw bytes)
        raise ExportError(f"{weights}: not a readable safetensors file ({e})") from e
    head = shapes.get(HEAD_WEIGHT)
    if head is None:
        problems.append(f"weights have no {HEAD_WEIGHT}")
    else:
        if head[0] != len(meta["classnames"]):
            problems.append(f"the head has {head[0]} classes but the export names "
                            f"{len(meta['classnames'])} (class count mismatch)")
        if len(head) != 2 or head[1] != dim:
            problems.append(f"the head takes {head[1:]} features but embed_dim is {dim} "
                            "(embedding size mismatch)")
    if shapes.get(HEAD_BIAS) not in (None, (head[0],) if head else None):
        problems.append(f"{HEAD_BIAS} has shape {shapes.get(HEAD_BIAS)}")
    if problems:
        raise ExportError(f"{folder}: " + "; ".join(problems) + "; refusing to load it")
    meta["_shapes"] = shapes
    return meta


@dataclass
class Prediction:
    labels: list[str]  # top-1 class name per image
    indices: np.ndarray  # (N,) int64 top-1 label index
    probabilities: np.ndarray  # (N, C) float32, softmax over the classes in label order

    def top_k(self, i: int, k: int, classnames: Sequence[str]) -> list[tuple[str, float]]:
        order = np.argsort(-self.probabilities[i], kind="stable")[:k]
        return [(classnames[j], float(self.probabilities[i, j])) for j in order]


class ExportedClassifier:
    """A loaded export: `predict(images)` -> class names and probabilities.

    images: file paths, encoded bytes, uint8 arrays (H, W[, 3|4]) or PIL images, mixed freely.
    Preprocessing is the training run's eval transform (resize + center crop + CLIP
    normalisation), applied exactly as during evaluation (uint8 crop, then normalise).
    """

    def __init__(self, folder: str | Path, meta: dict, module, transform):
        self.folder = Path(folder)
        self.meta = meta
        self.classnames: list[str] = list(meta["classnames"])
        self.module = module
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def to_uint8(self, image) -> torch.Tensor:
        return self.transform.to_uint8(as_pil(image))  # (3, H, W) uint8

    @torch.no_grad()
    def logits(self, uint8_batch: torch.Tensor) -> torch.Tensor:
        x = normalize_uint8(uint8_batch, self.transform.mean, self.transform.std)
        return self.module(x).float()  # (B, 3, H, W) -> (B, C)

    def predict(self, images: Iterable, batch_size: int = 64, progress=None) -> Prediction:
        images = list(images) if not isinstance(images, list) else images
        probs = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.stack([self.to_uint8(img) for img in chunk])
            probs.append(torch.softmax(self.logits(batch), dim=-1).numpy())
            if progress is not None:
                progress.update(len(chunk))
        p = np.concatenate(probs) if probs else np.zeros((0, self.num_classes), np.float32)
        idx = p.argmax(axis=1).astype(np.int64) if len(p) else np.zeros(0, np.int64)
        return Prediction([self.classnames[i] for i in idx], idx, p.astype(np.float32))





def load_export(folder: str | Path) -> ExportedClassifier:
    """Verify and load an export folder (safetensors + JSON only; see `verify_export`). The
    recorded architecture is first built without memory (torch's meta device): one that cannot
    be built, is absurdly large or does not fit the weights is refused before any allocation."""
    meta = verify_export(folder)
    shapes = meta.pop("_shapes")
    where = Path(folder) / META_FILE
    try:
        skeleton, _, params = _build_architecture(meta["open_clip"], meta["num_classes"],
                                                  meta["embed_dim"], device="meta")
    except Exception as e:  # whatever open_clip raises for a config it cannot build
        raise ExportError(f"{where}: open_clip cannot build the recorded architecture "
                          f"({type(e).__name__}: {shorten(str(e), 120)}); refusing to load it") from e
    if params > MAX_PARAMS:
        raise ExportError(f"{where}: the recorded architecture has {params:.3g} parameters (more "
                          f"than {MAX_PARAMS:.0g}): a corrupt open_clip section; refusing to load it")
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    problems = []
    if set(shapes) != set(expected):
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        if missing:
            problems.append(f"missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
    problems += [f"{k}: shape {shapes[k]}, the architecture needs {expected[k]}"
                 for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]]
    if problems:
        raise ExportError(f"{folder}: weights do not fit the recorded architecture: "
                          + "; ".join(problems[:5]) + "; refusing to load it")
    module, transform, _ = _build_architecture(meta["open_clip"], meta["num_classes"], meta["embed_dim"])
    module.load_state_dict(load_file(str(Path(folder) / meta["weights"])), strict=True)
    return ExportedClassifier(folder, meta, module.eval(), transform)


EXPORTS_LISTED = 3  # candidate export folders named when MODEL is ambiguous


def _plain(text: str, limit: int = 60) -> str:
    """`text` as it is when short and printable (a name, a path), else cli.shorten's bounded form."""
    return text if len(text) <= limit and text.isprintable() else shorten(text, limit)


def find_export(root: str | Path) -> Path:
    """The export folder at or below `root` (an MLflow download holds it one or two levels down).
    A file of an export (its JSON or weights) stands for its folder; a folder holding several
    exports is refused naming them (which one was meant is the user's choice, not sort order)."""
    root = Path(root)
    if root.is_file():
        if root.name in (META_FILE, WEIGHTS_FILE):
            return find_export(root.parent)
        raise ExportError(f"MODEL {_plain(str(root), 200)}: a file, not an export folder (give the "
                          f"folder holding {META_FILE} and {WEIGHTS_FILE})")
    if (root / META_FILE).is_file():
        return root
    hits = sorted(p.parent for p in root.rglob(META_FILE))
    if not hits:
        raise ExportError(f"{_plain(str(root), 200)}: no {META_FILE} found; not a regft export")
    if len(hits) > 1:
        names = ", ".join(_plain(str(h.relative_to(root))) for h in hits[:EXPORTS_LISTED])
        more = f" and {len(hits) - EXPORTS_LISTED} more" if len(hits) > EXPORTS_LISTED else ""
        raise ExportError(f"MODEL {_plain(str(root), 200)}: holds {len(hits)} exports ({names}{more}); "
                          "give the one to use")
    return hits[0]
