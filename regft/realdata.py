"""Real (labelled) evaluation images: a task's real test split and an optional real val split.

Layouts read (`open_real_split`; a `KIND:` prefix on the path forces one, otherwise detected):

- `imagefolder:DIR` — one sub-folder per class, named by the class name (case, `_` and `-`
  vs space are ignored: `red_circle/` is class "red circle"); images anywhere below it.
- `csv:FILE.csv` — rows `path,label` (a header row is optional). `label` is either a class name or
  the 0-based class index of the task; relative paths are relative to the CSV's folder.
- `coop:FILE.json` — a CoOp split file (`split_zhou_*.json`: {"train"|"val"|"test": [[path,
  label, classname], ...]}); images relative to the file's folder or the dataset's image folder.
  This is how tasks without an official test split (EuroSAT, Caltech101, SUN397) are tested.
- `torchvision:ROOT` — a torchvision dataset root, for the catalog tasks whose `Task.real_test`
  names a torchvision dataset with an official test split (cars, aircraft, pets, flowers,
  food101, dtd; imagenet uses its val split).
- no path and `Task.real_test == SHAPES_REAL` ("shapes:real"): the procedural testbed renders its
  own real test split (`regft.shapes.render_real_test`).

Labels are checked against the task: a folder, CSV or CoOp class name that is not one of the
task's classes is an error naming it (with the closest task class names); a subset of the classes
is allowed (with a warning). Torchvision datasets keep their label order (the catalog's class
names are in the real datasets' label order) unless their class names match the task's by name.

`Sealed` keeps a split closed until the caller opens it: the training loop seals the real test
split until epoch and alpha are selected, and optionally records every open/read in an audit file.
"""
from __future__ import annotations

import csv
import difflib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd
from PIL import Image

from regft.cli import shorten
from regft.errors import UserError
from regft.images import IMAGE_EXTS, image_files, load_rgb, short_path, unreadable_images
from regft.shapes import render_real_test
from regft.tasks import SHAPES_REAL, Task, resolve_task

log = logging.getLogger(__name__)

KINDS = ("imagefolder", "csv", "coop", "torchvision")

# torchvision class -> constructor arguments for the split we test on (official test splits only)
TORCHVISION_TEST = {
    "StanfordCars": {"split": "test"},
    "FGVCAircraft": {"split": "test", "annotation_level": "variant"},
    "OxfordIIITPet": {"split": "test"},
    "Flowers102": {"split": "test"},
    "Food101": {"split": "test"},
    "DTD": {"split": "test", "partition": 1},
    "ImageNet": {"split": "val"},
}
# CoOp split files use paths relative to the dataset's image folder
# a CSV's image paths are checked up to this many (a missing file is usually all or a pattern;
# stat-ing a million paths of a network share would take minutes)
CSV_PATHS_CHECKED = 10_000
LISTED = 10  # bad rows or labels quoted in an error
UNKNOWN_LISTED = 8  # unknown class names quoted, each with its closest task classes
COOP_FIELDS = 3  # a CoOp entry: [image path, label, class name]
UNREADABLE_LISTED = 3  # unreadable images quoted in an error
COOP_IMAGE_DIRS = ("", "images", "jpg", "2750", "101_ObjectCategories", "SUN397",
                   "UCF-101-midframes", "car_ims", "data/images")


def normalize_name(name: str) -> str:
    """Case-, underscore- and hyphen-insensitive form of a class name."""
    return re.sub(r"\s+", " ", re.sub(r"[_\-]+", " ", str(name))).strip().lower()


def _task_index(task: Task) -> dict[str, int]:
    index = {}
    for names in (task.classnames, task.gen_names):
        for i, n in enumerate(names):
            index.setdefault(normalize_name(n), i)
    return index


def map_labels(names: list[str], task: Task, where: str) -> dict[str, int]:
    """Map class names found in a real split to task label indices; error on unknown names."""
    index = _task_index(task)
    mapping, unknown = {}, []
    for n in dict.fromkeys(names):
        key = normalize_name(n)
        if key in index:
            mapping[n] = index[key]
        else:
            unknown.append(n)
    if unknown:
        hints = []
        for n in unknown[:UNKNOWN_LISTED]:
            close = difflib.get_close_matches(normalize_name(n), list(index), n=2, cutoff=0.6)
            hints.append(f"{n!r}" + (f" (closest task classes: {close})" if close else ""))
        raise UserError(
            f"{where}: {len(unknown)} class name(s) are not classes of task {task.name!r}: "
            f"{', '.join(hints)}{' ...' if len(unknown) > UNKNOWN_LISTED else ''}. Class names must "
            "match the task's (case, '_' and '-' ignored); use a CSV with integer labels for another naming"
        )
    covered = len(set(mapping.values()))
    if covered < task.num_classes:
        log.warning("%s: covers %d of the task's %d classes", where, covered, task.num_classes)
    return mapping


# ------------------------------------------------------------------------ datasets ----
class FileListDataset(torch.utils.data.Dataset):
    """(transform(PIL image), label) for a list of (image path, task label)."""

    def __init__(self, items: list[tuple[str, int]], transform: Callable | None = None, name: str = ""):
        self.items = items
        self.transform = transform
        self.name = name
        self.labels = [label for _, label in items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        img = load_rgb(path)
        return (self.transform(img) if self.transform else img), label


class ArrayDataset(torch.utils.data.Dataset):
    """(transform(PIL image), label) for in-memory uint8 (N, H, W, 3) images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None = None,
                 name: str = ""):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images for {len(labels)} labels")
        self.images, self.labels, self.transform, self.name = images, labels, transform, name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = Image.fromarray(np.asarray(self.images[i], dtype=np.uint8))
        return (self.transform(img) if self.transform else img), int(self.labels[i])


# ------------------------------------------------------------------------- readers ----
def _class_dirs(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def read_imagefolder(root: Path, task: Task, transform=None, where: str = "") -> FileListDataset:
    where = where or str(root)
    dirs = _class_dirs(root)
    if not dirs:
        raise UserError(f"{where}: no class sub-folders in {root} (an ImageFolder tree has one "
                        "folder per class, named by the class)")
    mapping = map_labels([d.name for d in dirs], task, where)
    items = []
    for d in dirs:
        items += [(str(p), mapping[d.name]) for p in image_files(d)]
    if not items:
        raise UserError(f"{where}: no images ({', '.join(sorted(IMAGE_EXTS))}) under {root}")
    return FileListDataset(items, transform, name=where)


def read_csv(path: Path, task: Task, transform=None, where: str = "") -> FileListDataset:
    where = where or str(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not a UTF-8 CSV file ({e.reason} at byte {e.start})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) < 2]
    if bad:
        raise UserError(f"{where}: rows {bad[:LISTED]} do not have the two columns path,label")
    if not rows:
        raise UserError(f"{where}: no rows (expected lines 'path,label')")
    labels = [r[1].strip() for r in rows]
    if all(re.fullmatch(r"-?\d+", s) for s in labels):
        ints = [int(s) for s in labels]
        out = sorted({i for i in ints if not 0 <= i < task.num_classes})
        if out:
            raise UserError(f"{where}: label index(es) {out[:LISTED]} outside 0..{task.num_classes - 1} "
                            f"(task {task.name!r} has {task.num_classes} classes)")
        targets = ints
    else:
        mapping = map_labels(labels, task, where)
        targets = [mapping[s] for s in labels]
    base = path.parent
    items = []
    for r, t in zip(rows, targets):
        img = Path(r[0].strip())
        items.append((str(img if img.is_absolute() else base / img), t))
    missing = [p for p, _ in items[:CSV_PATHS_CHECKED] if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{where}: {len(missing)} image file(s) not found, e.g. {missing[0]}")
    return FileListDataset(items, transform, name=where)


def read_coop(path: Path, task: Task, split: str, transform=None, where: str = "") -> FileListDataset:
    where = where or str(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{where}: not a readable CoOp split file ({shorten(str(e), 120)})") from e
    if not isinstance(data, dict) or split not in data:
        raise UserError(f"{where}: no {split!r} list in this CoOp split file")
    entries = data[split]
    if not isinstance(entries, list):
        raise UserError(f"{where}: {split!r} is {type(entries).__name__}, expected a list of "
                        "[path, label, classname]")
    if not entries:
        raise UserError(f"{where}: the {split!r} list is empty")
    bad = [i for i, e in enumerate(entries) if not _coop_entry(e)]
    if bad:
        raise UserError(f"{where}: {len(bad)} {split!r} entries are not [path, label, classname] "
                        f"(path and class name strings, label an integer), e.g. entry {bad[0]}: "
                        f"{shorten(entries[bad[0]])}")
    mapping = map_labels([e[2] for e in entries], task, where)
    root = next((path.parent / d for d in COOP_IMAGE_DIRS
                 if (path.parent / d / entries[0][0]).is_file()), None)
    if root is None:
        raise UserError(f"{where}: image {shorten(entries[0][0])} not found under {path.parent} or "
                        f"its sub-folders {[d for d in COOP_IMAGE_DIRS if d]}")
    items = [(str(root / e[0]), mapping[e[2]]) for e in entries]
    return FileListDataset(items, transform, name=where)


def _coop_entry(entry) -> bool:
    return (isinstance(entry, list) and len(entry) == COOP_FIELDS and isinstance(entry[0], str)
            and bool(entry[0]) and isinstance(entry[1], int) and not isinstance(entry[1], bool)
            and isinstance(entry[2], str))


def read_torchvision(root: Path, task: Task, transform=None, where: str = ""):
    where = where or str(root)
    spec = task.real_test or ""
    cls_name = spec.split(":", 1)[1] if spec.startswith("torchvision:") else None
    if cls_name is None:
        raise UserError(f"{where}: task {task.name!r} has no torchvision reader; give an "
                        "ImageFolder tree, a CSV of path,label or a CoOp split file")
    if cls_name not in TORCHVISION_TEST:
        raise UserError(
            f"{where}: torchvision's {cls_name} has no official test split; give the CoOp split "
            f"file (coop:/path/split_zhou_{cls_name}.json), a CSV of path,label or an ImageFolder tree"
        )
    try:
        ds = getattr(tvd, cls_name)(str(root), transform=transform, **TORCHVISION_TEST[cls_name])
    except (RuntimeError, FileNotFoundError, OSError) as e:
        raise UserError(f"{where}: not a torchvision {cls_name} root ({e})") from e
    classes = getattr(ds, "classes", None)
    if classes:
        names = [c[0] if isinstance(c, (tuple, list)) else c for c in classes]
        index = _task_index(task)
        by_name = [index.get(normalize_name(n)) for n in names]
        if None not in by_name and len(set(by_name)) == len(by_name):
            if by_name != list(range(len(by_name))):  # reorder to the task's labels
                ds = getattr(tvd, cls_name)(str(root), transform=transform,
                                            target_transform=by_name.__getitem__,
                                            **TORCHVISION_TEST[cls_name])
            return ds
        if len(names) != task.num_classes:
            raise UserError(f"{where}: {cls_name} has {len(names)} classes, task {task.name!r} "
                            f"has {task.num_classes}")
        log.info("%s: class names differ from the task's; using the dataset's label order", where)
    return ds


def _looks_like_imagefolder(root: Path, task: Task) -> bool:
    dirs = _class_dirs(root)
    index = _task_index(task)
    hits = sum(normalize_name(d.name) in index for d in dirs)
    return bool(dirs) and hits >= max(1, len(dirs) // 2)


def detect_kind(path: str, task: Task) -> tuple[str, Path]:
    """(kind, path) for a real-data path, from an explicit `kind:` prefix or the layout."""
    for kind in KINDS:
        if path.startswith(kind + ":"):
            return kind, Path(path[len(kind) + 1:]).expanduser()
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"{path}: no such file or folder")
    if p.is_file():
        if p.suffix.lower() == ".csv":
            return "csv", p
        if p.suffix.lower() == ".json":
            return "coop", p
        raise UserError(f"{path}: a real-data file must be a .csv (path,label) or a CoOp .json split")
    if _looks_like_imagefolder(p, task):
        return "imagefolder", p
    coop = sorted(p.glob("split_zhou_*.json"))
    if coop:
        return "coop", coop[0]
    if (task.real_test or "").startswith("torchvision:"):
        return "torchvision", p
    raise UserError(
        f"{path}: neither an ImageFolder tree with folders named by the classes of task "
        f"{task.name!r}, nor a CSV (path,label), nor a CoOp split file"
    )


def open_real_split(task: Task, path: str | None, split: str, transform: Callable | None = None):
    """A torch Dataset of (transform(PIL image), task label) for a real split, or None.

    split: "test" or "val". `path` None: the task's built-in real test split if it has one
    (shapes), else None. Opening reads file lists and labels, never pixels.
    """
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    where = f"--real-{split} {path}"
    if path is None or path == SHAPES_REAL:
        if split == "test" and task.real_test == SHAPES_REAL:
            return _shapes_real_test(transform)
        if path == SHAPES_REAL:
            raise UserError(f"{where}: only the shapes task has a built-in real test split")
        return None
    kind, p = detect_kind(path, task)
    if not p.exists():
        raise UserError(f"{where}: no such file or folder")
    if kind == "imagefolder":
        return read_imagefolder(p, task, transform, where)
    if kind == "csv":
        return read_csv(p, task, transform, where)
    if kind == "coop":
        return read_coop(p, task, split, transform, where)
    if split != "test":
        raise UserError(f"{where}: torchvision roots are read for the test split only; give an "
                        "ImageFolder tree, a CSV or a CoOp split file for validation")
    return read_torchvision(p, task, transform, where)


def _shapes_real_test(transform):
    images, labels = render_real_test()
    return ArrayDataset(images, labels, transform, name=SHAPES_REAL)


def has_real_test(task: Task, path: str | None) -> bool:
    return path is not None or task.real_test == SHAPES_REAL


# ------------------------------------------------------------------------- sealing ----
class SealedSplitError(RuntimeError):
    """A sealed split was read before it was unsealed (a selection leak)."""


@dataclass
class Audit:
    """Append-only JSON-lines record of split events (`path` None: record nothing)."""

    path: str | None = None
    rank: int = 0

    def record(self, event: str, **fields) -> None:
        if not self.path:
            return
        line = json.dumps({"t": time.time(), "rank": self.rank, "event": event, **fields})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def read_audit(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Sealed:
    """A split that cannot be opened until `unseal()`: `dataset` raises SealedSplitError before.

    The split is opened lazily (the factory runs on first access after unsealing), so not even
    its file list is read while sealed. Opening is recorded in the audit.
    """

    def __init__(self, name: str, factory: Callable[[], torch.utils.data.Dataset],
                 audit: Audit | None = None):
        self.name = name
        self._factory = factory
        self._audit = audit or Audit()
        self._sealed = True
        self._dataset = None

    @property
    def sealed(self) -> bool:
        return self._sealed

    def unseal(self) -> None:
        self._sealed = False
        self._audit.record("unseal", split=self.name)

    @property
    def dataset(self):
        if self._sealed:
            self._audit.record("blocked_read", split=self.name)
            raise SealedSplitError(
                f"split {self.name!r} was read before selection was final; it may only be reported"
            )
        if self._dataset is None:
            self._dataset = self._factory()
            self._audit.record("open", split=self.name, size=len(self._dataset))
        return self._dataset


# ------------------------------------------------------------- pre-flight checks ----
def real_split_problems(task: Task, path: str | None, split: str) -> list[str]:
    """Open one real split's file list and labels, then decode every image of it (reduced scale,
    on threads: images.unreadable_images): a missing folder, classes that are not the task's, an
    empty split or one unreadable image fail here, before any work, not in the report-only
    evaluation after every trial trained."""
    if path is None or (split == "test" and path == SHAPES_REAL == task.real_test):
        return []  # nothing given, or the testbed's rendered split (nothing to check)
    try:
        ds = open_real_split(task, path, split)
    except UserError as e:  # a bug's ValueError keeps its traceback
        return [str(e)]
    if ds is None:
        return []
    if len(ds) == 0:
        return [f"--real-{split} {path}: no images"]
    return unreadable_problems(ds, f"--real-{split} {path}")


def image_paths(ds) -> list[str] | None:
    """The image files of a real split's dataset (a FileListDataset or a torchvision dataset),
    None where it keeps no file list (rendered arrays)."""
    if isinstance(ds, FileListDataset):
        return [p for p, _ in ds.items]
    for attr in ("_image_files", "_samples", "samples", "_images"):  # torchvision's names
        files = getattr(ds, attr, None)
        if isinstance(files, list) and files:
            return [str(f[0] if isinstance(f, (tuple, list)) else f) for f in files]
    return None


def unreadable_problems(ds, where: str) -> list[str]:
    """[] when every image of `ds` decodes, else one problem naming the first few that do not."""
    paths = image_paths(ds)
    if not paths:
        return []
    t0 = time.time()
    bad = unreadable_images(paths)
    log.info("%s: %d images checked readable in %.1f s", where, len(paths), time.time() - t0)
    if not bad:
        return []
    shown = "; ".join(f"{short_path(p, 80)} ({r})" for p, r in bad[:UNREADABLE_LISTED])
    return [f"{where}: {len(bad)} of {len(paths)} images cannot be read: {shown}"
            f"{' ...' if len(bad) > UNREADABLE_LISTED else ''}; fix or remove them"]


def check_real_data(cfg) -> list[str]:
    """Both real splits of a training config (a regft.train.TrainConfig; see
    `real_split_problems`)."""
    task = resolve_task(cfg.task, cfg.classnames, cfg.max_classes)
    return real_split_problems(task, cfg.real_test, "test") + real_split_problems(task, cfg.real_val, "val")
