"""Task catalog: a name-only task is its class names (label order), CLIP zero-shot templates,
the generation template and names, and optionally per-class descriptions for the head.

Class names are package data (`regft/data/tasks/*.json`, sources in `regft/data/SOURCES.md`),
the procedural testbed's `shapes.json` included (its real test split, `SHAPES_REAL`, is rendered
by regft.shapes). A user task comes from a text file of class names, one per line
(`task_from_classnames_file`).
"""
from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

from regft.cli import shorten
from regft.config import read_user_text
from regft.errors import TaskError, UserError

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEFAULT_GENERATION_TEMPLATE = "a photo of a {}."


# names that become folder, file, run and experiment names: one path component, no shell
# metacharacters, no leading '-' or '.' (class names themselves are data and may hold anything)
MAX_NAME = 100  # characters; well inside every filesystem's 255-byte component limit
SAFE_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}$")
LISTED = 10  # bad lines quoted in an error


def safe_slug(value: str) -> str:
    """`value` with every run of unsafe characters replaced by '_' (a file-name-safe form)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._-")[:MAX_NAME]
    return slug or "task"


def unsafe_name_problem(value: str, field: str) -> str | None:
    """None if `value` is a safe name (SAFE_NAME), else a message naming the field and a fix."""
    if SAFE_NAME.match(value):
        return None
    return (f"{field} {shorten(value)}: names folders and runs, so it may hold only letters, digits, "
            f"'.', '_' and '-' (starting with a letter or digit, at most {MAX_NAME}); e.g. "
            f"{safe_slug(value)!r}")


@dataclass(frozen=True)
class Task:
    name: str
    classnames: tuple[str, ...]  # label order; used in zero-shot text prompts
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    generation_template: str = DEFAULT_GENERATION_TEMPLATE
    generation_classnames: tuple[str, ...] = ()  # same order; defaults to classnames
    descriptions_file: str | None = None  # package-relative, keyed by generation class name
    real_test: str | None = None  # how to read the real test split, e.g. "torchvision:StanfordCars"
    source: str = "catalog"

    def __post_init__(self):
        # Catalog lists are published data and are kept as published (ImageNet's CLIP names
        # repeat 'missile' and 'sunglasses'); user files get the full check in
        # task_from_classnames_file.
        problems = []
        if len(self.classnames) < 2 or any(not n.strip() for n in self.classnames):
            problems.append(f"task {self.name!r}: needs at least 2 non-blank class names")
        if self.generation_classnames and len(self.generation_classnames) != len(self.classnames):
            problems.append(
                f"task {self.name!r}: {len(self.generation_classnames)} generation names for "
                f"{len(self.classnames)} classes"
            )
        if problems:
            raise TaskError("; ".join(problems))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    @property
    def gen_names(self) -> tuple[str, ...]:
        return self.generation_classnames or self.classnames

    def first(self, n: int | None) -> Task:
        """The task restricted to its first n classes (smoke runs of big tasks); the name says so."""
        if n is None or n >= self.num_classes:
            return self
        if n < 2:
            raise TaskError(f"max_classes: a classifier needs at least 2 classes, got {n}")
        return replace(
            self,
            name=f"{self.name}-first{n}",
            classnames=self.classnames[:n],
            generation_classnames=self.generation_classnames[:n],
            real_test=None,  # a full real test split has labels outside the subset
        )

    def descriptions(self) -> list[list[str]] | None:
        """Per-class description lists in label order, or None when the task has none."""
        if not self.descriptions_file:
            return None
        data = json.loads(_data_path(self.descriptions_file).read_text(encoding="utf-8"))
        return [list(data[name]) for name in self.gen_names]

    def zeroshot_texts(self) -> list[list[str]]:
        """Texts whose embeddings build each class's head row: descriptions, else templates."""
        desc = self.descriptions()
        if desc is not None:
            return desc
        return [[t.format(c) for t in self.templates] for c in self.classnames]


def _data_path(rel: str) -> Path:
    return Path(str(resources.files("regft") / "data" / rel))


# a task's `real_test` meaning "the procedural testbed renders its own real test split"
# (regft.shapes.render_real_test; read by regft.realdata.open_real_split)
SHAPES_REAL = "shapes:real"

# torchvision dataset class able to read each catalog task's real test split (see regft.realdata);
# a task file's own "real_test" (shapes.json) takes precedence
REAL_TEST = {
    "cars": "torchvision:StanfordCars",
    "aircraft": "torchvision:FGVCAircraft",
    "pets": "torchvision:OxfordIIITPet",
    "flowers": "torchvision:Flowers102",
    "food101": "torchvision:Food101",
    "dtd": "torchvision:DTD",
    "eurosat": "torchvision:EuroSAT",
    "caltech101": "torchvision:Caltech101",
    "sun397": "torchvision:SUN397",
    "ucf101": None,  # video frames: use an ImageFolder or CSV of middle frames
    "imagenet": "torchvision:ImageNet",
}


def available_tasks() -> list[str]:
    return sorted(p.stem for p in _data_path("tasks").glob("*.json"))


def load_task(name: str) -> Task:
    path = _data_path(f"tasks/{name}.json") if SAFE_NAME.match(name) else None
    if path is None or not path.is_file():
        raise TaskError(
            f"unknown task {name!r}; known tasks: {', '.join(available_tasks())} "
            "(or pass --classnames FILE with one class name per line)"
        )
    rec = json.loads(path.read_text(encoding="utf-8"))
    if rec.get("classnames_source") == "open_clip.zero_shot_metadata":
        # open_clip takes seconds to import; only ImageNet's names come from it
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        classnames = tuple(IMAGENET_CLASSNAMES)
        templates = tuple(t("{}") if callable(t) else t for t in OPENAI_IMAGENET_TEMPLATES)
    else:
        classnames, templates = tuple(rec["classnames"]), tuple(rec["templates"])
    return Task(
        name=name,
        classnames=classnames,
        templates=templates,
        generation_template=rec["generation_template"],
        generation_classnames=tuple(rec["generation_classnames"]),
        descriptions_file=rec.get("descriptions"),
        real_test=rec["real_test"] if "real_test" in rec else REAL_TEST.get(name),
        source=f"catalog:{name}",
    )


# A class-name file is a short list (ImageNet-21k's 21,841 names are ~0.5 MB); anything far
# larger is the wrong file, and is refused before it is read into memory
MAX_CLASSNAMES_BYTES = 4 * 2**20
MAX_CLASSES = 100_000
# CLIP reads 77 tokens; a "name" much longer than a sentence is a pasted paragraph or a CSV row
MAX_CLASSNAME = 300
# characters that are invisible or reorder text: two names that look the same may differ by one
# (zero-width space, direction marks, bidirectional embeddings/overrides/isolates, word joiner,
# a byte-order mark inside the file)
INVISIBLE = frozenset("\u200b\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                      "\u2060\u2066\u2067\u2068\u2069\ufeff")


def normalize_classname(name: str) -> str:
    """A class name as it is used: Unicode NFC, runs of white space collapsed to one space."""
    return " ".join(unicodedata.normalize("NFC", name).split())


def classname_key(name: str) -> str:
    """What makes two class names the same class: equal after normalize_classname, compatibility
    folding (NFKC: full-width letters, ligatures) and case folding."""
    return unicodedata.normalize("NFKC", normalize_classname(name)).casefold()


def _bad_character(name: str) -> str | None:
    """The first control, line-separator or invisible character of `name`, as U+XXXX."""
    for ch in name:
        if ch == "\t":
            continue  # white space: collapsed like a space
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in INVISIBLE:
            return f"U+{ord(ch):04X}"
    return None


def validate_classnames(names: list[str], where: str) -> list[str]:
    """Every problem with a list of class names, as messages (empty list: fine). Names are
    compared as classname_key compares them; line numbers count from 1."""
    problems = []
    if not names:
        problems.append(f"{where}: no class names")
    if len(names) > MAX_CLASSES:
        problems.append(f"{where}: {len(names)} class names, more than {MAX_CLASSES}")
        return problems
    blanks = [i + 1 for i, n in enumerate(names) if not n.strip()]
    if blanks:
        problems.append(f"{where}: blank class name on line(s) {blanks[:LISTED]}")
    bad = [(i + 1, c) for i, n in enumerate(names) if (c := _bad_character(n))]
    if bad:
        problems.append(f"{where}: control or invisible character on line(s) "
                        f"{', '.join(f'{i} ({c})' for i, c in bad[:LISTED])}; remove it")
    long = [i + 1 for i, n in enumerate(names) if len(n) > MAX_CLASSNAME]
    if long:
        problems.append(f"{where}: class name longer than {MAX_CLASSNAME} characters on line(s) "
                        f"{long[:LISTED]} (one name per line)")
    seen: dict[str, int] = {}
    dups = []
    for i, n in enumerate(names):
        key = classname_key(n)
        if key and key in seen:
            dups.append(f"{shorten(normalize_classname(n), 40)} (lines {seen[key]} and {i + 1})")
        seen.setdefault(key, i + 1)
    if dups:
        problems.append(f"{where}: duplicate class name(s) {', '.join(dups[:LISTED])} (names equal "
                        "up to case, Unicode form and white space are one class)")
    if names and len(names) < 2:
        problems.append(f"{where}: a classifier needs at least 2 classes, got {len(names)}")
    return problems


def task_from_classnames_file(path: str | Path, name: str | None = None) -> Task:
    """A task from a UTF-8 text file, one class name per line, in label order.

    Read by config.read_user_text (BOM dropped; not UTF-8, NUL, too large: refused). Lines end
    at LF, CR LF or CR. A trailing newline is fine; a blank line inside, a control or invisible
    character, a duplicate (classname_key) or an empty file is rejected, naming the lines.
    Names are kept as normalize_classname gives them.
    """
    where = f"--classnames {shorten(str(path))}"
    try:
        text = read_user_text(path, "--classnames", MAX_CLASSNAMES_BYTES)
    except UserError as e:
        raise TaskError(str(e)) from None
    lines = re.split(r"\r\n|\r|\n", text)
    while lines and not lines[-1].strip():  # allow trailing blank lines only
        lines.pop()
    problems = validate_classnames(lines, where=where)
    if name is not None and unsafe_name_problem(name, "task name"):
        problems.append(unsafe_name_problem(name, "task name"))
    if problems:
        raise TaskError("; ".join(problems))
    return Task(
        name=name or safe_slug(Path(path).stem),
        classnames=tuple(normalize_classname(n) for n in lines),
        source=f"file:{Path(path).name}",
    )


def resolve_task(task: str | None, classnames: str | None = None,
                 max_classes: int | None = None) -> Task:
    """CLI helper: a catalog task name or a class-name file, optionally its first N classes."""
    if classnames:
        t = task_from_classnames_file(classnames, name=task)
    elif not task:
        raise TaskError("give a task name (e.g. cars) or --classnames FILE")
    else:
        t = load_task(task)
    return t.first(max_classes)
