"""Procedural shapes testbed: a small, deterministic world where name-only transfer behaves like
the paper's setting (docs/shapes-testbed.md).

- Objects are (colour, shape) pairs from 8 colours x 8 shapes, rendered with numpy.
- **Real domain** (what CLIP was pretrained on and what the task is tested on): object of random
  size and position, slightly rotated, jittered colour, on a random smooth background with
  pixel noise.
- **Generated domain** (`ShapesGenerator`): the same classes with a systematic style shift of the
  kind a text-to-image model introduces, scaled by `gap` in [0, 1]: centred and large objects,
  class-correlated backgrounds (a pale tint of the object's colour, the colour bleeding of
  text-to-image models, plus a small per-class offset), a dark outline, shading
  texture, boosted saturation, less noise and a blur. gap = 0 reproduces the real domain exactly
  (same random draws), so it is the no-shift control.
- **Diversity collapse** (`collapse` in [0, 1], independent of the gap): a text-to-image model
  repeats itself for one prompt (similar pose, framing, background). Each class has
  `COLLAPSE_MODES` fixed "modes" (one set of nuisance draws each, a function of the class name
  only); every image is assigned one, and its nuisances (size, position, rotation, colour jitter,
  background colour and texture) move towards the mode's by `collapse`. collapse = 0 is the
  renderer before the knob, bit for bit; at 1 a class has `COLLAPSE_MODES` poses / framings /
  backgrounds, the images of one mode differing only by pixel noise.
- Task `shapes`: 16 colour-shape classes (each colour and each shape appears twice, so both
  attributes are needed). Its real test split is rendered in the real domain.
- A tiny CLIP pretrained contrastively on real-domain images of all 64 combinations ships in
  `regft/pretrained/shapes-clip` (made by scripts/pretrain_shapes.py, see MADE.md there) and
  loads through open_clip's `local-dir:` path: `create_clip(shapes_model_name(), None)`.

Every image is a pure function of (class name, seed, gap, collapse, resolution): one numpy
Generator per image, seeded from the seed and a CRC of the class name, and every random number
is drawn in a fixed order whatever the gap and collapse.
"""
from __future__ import annotations

import hashlib
import numbers
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from regft.errors import UserError
from regft.tasks import Task, load_task

SHAPES_VERSION = "shapes-v1"  # bump when rendering changes: it is part of the generator identity
SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "heart")
COLOURS = {  # base RGB in [0, 1]
    "red": (0.85, 0.10, 0.10),
    "orange": (0.95, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.65, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.10, 0.20, 0.90),
    "purple": (0.55, 0.15, 0.75),
    "pink": (0.98, 0.50, 0.75),
}
# 16 target classes: shape i with colour i and colour i+3 (mod 8), so every colour and every
# shape occurs in exactly two classes and neither attribute alone identifies a class.
_C = tuple(COLOURS)
TASK_CLASSES = tuple(
    f"{_C[(i + k) % 8]} {SHAPES[i]}" for i in range(8) for k in (0, 3)
)
# the task's templates; regft/data/tasks/shapes.json holds them with TASK_CLASSES (a test checks)
TEMPLATES = ("a photo of a {}.",)
GENERATION_TEMPLATE = "a photo of a {}."
REAL_TEST_PER_CLASS = 100  # 1,600 real test images
RESOLUTION = 32  # pixels: the shipped CLIP's input size, and every default below
REAL_TEST_SEED = 0
# captions of the pretraining pairs (scripts/pretrain_shapes.py); {c} colour, {s} shape
CAPTION_TEMPLATES = (
    "a photo of a {c} {s}.",
    "a {c} {s}.",
    "a picture of a {c} {s}.",
    "a {s} that is {c}.",
)
PRETRAINED_DIR = "shapes-clip"
# Diversity collapse: a handful of modes per prompt (pose, framing, background), fixed before any
# measurement and never tuned (docs/shapes-testbed.md, "Diversity collapse").
COLLAPSE_MODES = 4
_MODE_SALT = 0x6D6F6465  # "mode": the class modes' stream, apart from every image's own stream
_MODE_CHOICE_STREAM = 1  # the image's mode is drawn from (seed, class, this), not its own stream


def shapes_task() -> Task:
    """The testbed's task: a catalog task like the others (regft/data/tasks/shapes.json), whose
    real test split (`regft.tasks.SHAPES_REAL`) is rendered by `render_real_test`."""
    return load_task("shapes")


def shapes_pretrained_dir() -> str:
    return str(resources.files("regft") / "pretrained" / PRETRAINED_DIR)


def shapes_model_name() -> str:
    """open_clip model name of the shipped tiny pretrained CLIP (`local-dir:` schema)."""
    return "local-dir:" + shapes_pretrained_dir()


def parse_classname(classname: str) -> tuple[str, str]:
    """'red circle' -> ('red', 'circle'); UserError naming the valid words otherwise."""
    parts = classname.strip().lower().split()
    if len(parts) != 2 or parts[0] not in COLOURS or parts[1] not in SHAPES:
        raise UserError(
            f"shapes: class name {classname!r} is not '<colour> <shape>' with colour in "
            f"{sorted(COLOURS)} and shape in {list(SHAPES)}"
        )
    return parts[0], parts[1]


# ---------------------------------------------------------------- rendering ----

def _rng(classname: str, seed: int) -> np.random.Generator:
    key = zlib.crc32(classname.encode())
    return np.random.default_rng(np.random.SeedSequence([int(seed) & (2**64 - 1), key]))


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask in object coordinates (object roughly fills [-1, 1]^2, y points down)."""
    r2 = x * x + y * y
    if shape == "circle":
        return r2 <= 1.0
    if shape == "ring":
        return (r2 <= 1.0) & (r2 >= 0.55**2)
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.82
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= 1.0
    if shape == "triangle":  # pointing up
        return (y <= 0.6) & (y >= -1.0 + 1.8 * np.abs(x))
    if shape == "cross":
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 0.3) & (ay <= 0.95)) | ((ay <= 0.3) & (ax <= 0.95))
    if shape == "star":  # five points, one pointing up
        theta = np.arctan2(y, x) + np.pi / 2
        period = 2 * np.pi / 5
        t = np.mod(theta, period) / period
        edge = 0.42 + 0.6 * np.abs(2 * t - 1)
        return np.sqrt(r2) <= edge
    if shape == "heart":
        hx, hy = 1.15 * x, -1.15 * y + 0.25
        return (hx * hx + hy * hy - 1) ** 3 - hx * hx * hy**3 <= 0
    raise ValueError(f"unknown shape {shape!r}")


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, 3) with reflect padding; sigma in pixels."""
    if sigma <= 1e-3:
        return img
    radius = 2
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    tmp = sum(k[i] * pad[:, i:i + w] for i in range(2 * radius + 1))  # (H+2r, W, 3)
    return sum(k[i] * tmp[i:i + h] for i in range(2 * radius + 1))  # (H, W, 3)


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise: a (cells x cells) grid bilinearly upsampled to (size, size, channels)."""
    grid = rng.standard_normal((cells, cells, channels))
    pos = np.linspace(0, cells - 1, size)
    i0 = np.floor(pos).astype(int).clip(0, cells - 2)
    f = (pos - i0)[:, None]
    rows = grid[i0] * (1 - f)[..., None] + grid[i0 + 1] * f[..., None]  # (size, cells, ch)
    cols = rows[:, i0] * (1 - f.T)[..., None] + rows[:, i0 + 1] * f.T[..., None]
    return cols  # (size, size, ch)


def class_background(classname: str) -> np.ndarray:
    """The generated domain's class-correlated background colour (RGB in [0, 1]).

    Text-to-image models bleed a prompt's colour into the scene: the background is a pale tint
    of the object's colour plus a small per-class offset. It tells the colour (which two classes
    share), not the shape, so it is a partial shortcut, as a shared "generated look" is among
    fine-grained classes.
    """
    colour, _ = parse_classname(classname)
    h = hashlib.sha256(f"shapes-bg\x1f{classname}".encode()).digest()
    offset = (np.frombuffer(h[:3], dtype=np.uint8) / 255.0 - 0.5) * 0.16
    return 0.45 * np.asarray(COLOURS[colour]) + 0.55 * 0.72 + offset


@dataclass(frozen=True)
class _Draws:
    """Every random number of one image, drawn in this fixed order whatever the gap."""

    r_real: float  # object radius, real domain
    c_real: np.ndarray  # (2,) object centre, real domain
    angle_real: float
    col_jit: np.ndarray  # (3,) colour jitter
    bright: float
    bg_mean: np.ndarray  # (3,) real background colour
    bg_field: np.ndarray  # (H, W, 3) low-frequency background variation
    noise: np.ndarray  # (H, W, 3) pixel noise
    r_gen: float  # object radius, generated domain
    c_gen: np.ndarray  # (2,) object centre, generated domain
    bg_gen_jit: np.ndarray  # (3,) jitter of the class background


def _draw(rng: np.random.Generator, resolution: int) -> _Draws:
    r_real = rng.uniform(0.40, 0.65)
    return _Draws(
        r_real=r_real,
        c_real=rng.uniform(-1, 1, 2) * (0.95 - r_real),
        angle_real=rng.uniform(-0.3, 0.3),
        col_jit=rng.normal(0, 0.05, 3),
        bright=rng.uniform(0.8, 1.1),
        bg_mean=0.5 * rng.uniform(0.15, 0.85) + 0.5 * rng.uniform(0, 1, 3),
        bg_field=_smooth_field(rng, resolution, 4, 3),
        noise=rng.standard_normal((resolution, resolution, 3)),
        r_gen=rng.uniform(0.62, 0.78),
        c_gen=rng.normal(0, 0.04, 2),
        bg_gen_jit=rng.normal(0, 0.05, 3),
    )


def _class_mode(classname: str, mode: int, resolution: int) -> _Draws:
    """The nuisance draws of one of a class's modes: a typical image's, from the same
    distribution; a function of the class name (the prompt) only, as a model's modes are."""
    key = zlib.crc32(classname.encode())
    return _draw(np.random.default_rng(np.random.SeedSequence([_MODE_SALT, key, mode])), resolution)


def _collapse_draws(d: _Draws, classname: str, seed: int, collapse: float,
                    resolution: int) -> _Draws:
    """`d` moved towards the image's class mode by `collapse` (0: `d` itself). The mode is drawn
    from a stream of its own, so the image's draws are those of collapse 0; pixel noise stays
    the image's own."""
    if collapse == 0:
        return d
    key = zlib.crc32(classname.encode())
    pick = np.random.default_rng(
        np.random.SeedSequence([int(seed) & (2**64 - 1), key, _MODE_CHOICE_STREAM]))
    m = _class_mode(classname, int(pick.integers(COLLAPSE_MODES)), resolution)
    c = float(collapse)
    mix = {f: (1 - c) * getattr(d, f) + c * getattr(m, f)
           for f in d.__dataclass_fields__ if f != "noise"}
    return _Draws(noise=d.noise, **mix)


def unit_interval_problem(name: str, value, meaning: str) -> str | None:
    """`name` must be a number in [0, 1] (not a bool, NaN or infinity); the problem, else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        return f"{name} must be in [0, 1] ({meaning}), got {value!r}"
    return None


GAP_MEANING = "0 = real domain, 1 = full shift"
COLLAPSE_MEANING = "0 = as diverse as the real domain, 1 = a few modes per class"


def _downsample(a: np.ndarray, resolution: int) -> np.ndarray:
    """(2H, 2W) supersampled -> (H, W), each pixel the mean of its 2x2 block."""
    return a.reshape(resolution, 2, resolution, 2).mean(axis=(1, 3))


def render(classname: str, seed: int, gap: float = 0.0, resolution: int = RESOLUTION,
           collapse: float = 0.0) -> np.ndarray:
    """One image, uint8 (resolution, resolution, 3): real domain at gap=0, generated at gap=1;
    `collapse` pulls its nuisances towards one of its class's few modes (0: none).

    A pure function of its arguments. All random numbers are drawn in the same order for every
    gap and collapse, so gap only moves the style and collapse only the diversity, never the
    object's identity.
    """
    problems = [p for p in (unit_interval_problem("gap", gap, GAP_MEANING),
                            unit_interval_problem("collapse", collapse, COLLAPSE_MEANING)) if p]
    if problems:
        raise UserError("shapes: " + "; ".join(problems))
    if resolution < 8:
        raise UserError(f"shapes: resolution must be >= 8, got {resolution}")
    colour, shape = parse_classname(classname)
    d = _collapse_draws(_draw(_rng(classname, seed), resolution), classname, seed, collapse,
                        resolution)
    g = float(gap)
    ss = 2 * resolution  # supersampled grid, averaged 2x2 at the end (anti-aliasing)

    # --- geometry: random placement (real) -> centred and large (generated) ---
    r = (1 - g) * d.r_real + g * d.r_gen
    cx, cy = (1 - g) * d.c_real + g * d.c_gen
    angle = (1 - g) * d.angle_real
    p = (np.arange(ss) + 0.5) / ss * 2 - 1
    u, v = np.meshgrid(p, p)  # u: x (columns), v: y (rows, down)
    ca, sa = np.cos(angle), np.sin(angle)
    xo = (ca * (u - cx) + sa * (v - cy)) / r
    yo = (-sa * (u - cx) + ca * (v - cy)) / r
    mask_ss = _shape_mask(shape, xo, yo).astype(np.float64)
    mask = _downsample(mask_ss, resolution)[..., None]  # (H, W, 1)

    # --- object colour: jitter, then saturation/contrast boost and shading with the gap ---
    base = np.asarray(COLOURS[colour])
    col = np.clip((base + d.col_jit) * d.bright, 0, 1)
    sat = col.mean() + (col - col.mean()) * 1.4
    col = (1 - g) * col + g * np.clip(sat, 0, 1)
    xs, ys = _downsample(xo, resolution), _downsample(yo, resolution)
    shade = 1.0 + g * 0.22 * (-0.5 * xs - 0.5 * ys).clip(-1.5, 1.5)  # "3D" lighting texture
    obj = col[None, None, :] * shade[..., None]

    # --- background: random smooth colour (real) -> class-correlated studio colour ---
    bg_real = d.bg_mean[None, None, :] + 0.10 * d.bg_field
    bg_cls = class_background(classname) + d.bg_gen_jit
    vgrad = np.linspace(0.08, -0.08, resolution)[:, None, None]
    bg = (1 - g) * bg_real + g * (bg_cls[None, None, :] + vgrad)

    img = mask * obj + (1 - mask) * bg

    # --- outline: dark rim just outside the object, opacity = gap ---
    if g > 0:
        grown = _shape_mask(shape, xo / 1.12, yo / 1.12).astype(np.float64)
        rim = _downsample(grown, resolution)[..., None] - mask
        img = img * (1 - g * 0.85 * rim.clip(0, 1)) + 0.0

    # --- noise down, blur up with the gap ---
    img = img + ((1 - g) * 0.04 + g * 0.015) * d.noise
    img = _blur(img, 0.7 * g)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def real_seed(classname: str, index: int, seed: int, split: str) -> int:
    key = f"shapes-real\x1f{split}\x1f{classname}\x1f{index}\x1f{seed}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def render_real_test(
    n_per_class: int = REAL_TEST_PER_CLASS,
    seed: int = REAL_TEST_SEED,
    resolution: int = RESOLUTION,
    classnames: tuple[str, ...] = TASK_CLASSES,
    split: str = "test",
) -> tuple[np.ndarray, np.ndarray]:
    """The task's real test split: (images uint8 N x H x W x 3, labels int64 N), class-major.
    Another `split` name (e.g. "val": a labelled real val split for `--real-val`) renders other
    real-domain images: the name enters every image's seed."""
    if n_per_class <= 0:
        raise UserError(f"shapes: n_per_class must be > 0, got {n_per_class}")
    images, labels = [], []
    for label, name in enumerate(classnames):
        for i in range(n_per_class):
            images.append(render(name, real_seed(name, i, seed, split), 0.0, resolution))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_real_test(root: str, n_per_class: int = REAL_TEST_PER_CLASS, seed: int = REAL_TEST_SEED,
                    resolution: int = RESOLUTION, split: str = "test") -> str:
    """Write the real test split (or another real `split`, as render_real_test) as an ImageFolder
    tree root/<class name>/<index>.png."""
    images, labels = render_real_test(n_per_class, seed, resolution, split=split)
    out = Path(root)
    counts: dict[int, int] = {}
    for img, label in zip(images, labels):
        folder = out / TASK_CLASSES[int(label)].replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        i = counts.get(int(label), 0)
        counts[int(label)] = i + 1
        Image.fromarray(img).save(folder / f"{i:05d}.png")
    return str(out)


class ShapesGenerator:
    """Procedural stand-in for a text-to-image model, same interface as the diffusers generator.

    The image for an item depends only on (class name, seed, gap, collapse, resolution); prompts
    and labels are accepted for interface compatibility and ignored (the class name carries the
    content).
    """

    def __init__(self, resolution: int = RESOLUTION, gap: float = 1.0, collapse: float = 0.0):
        problems = []
        if not isinstance(resolution, int) or resolution < 8:
            problems.append(f"resolution must be an int >= 8, got {resolution!r}")
        problems += [p for p in (unit_interval_problem("gap", gap, GAP_MEANING),
                                 unit_interval_problem("collapse", collapse, COLLAPSE_MEANING)) if p]
        if problems:
            raise UserError("ShapesGenerator: " + "; ".join(problems))
        self.resolution = resolution
        self.gap = float(gap)
        self.collapse = float(collapse)

    def identity(self) -> dict:
        """What determines the images. `collapse` only when nonzero: at 0 the renderer is the one
        before the knob, so every dataset id made before it stays valid."""
        ident = {"generator": "shapes", "version": SHAPES_VERSION,
                 "resolution": self.resolution, "gap": self.gap}
        return {**ident, "collapse": self.collapse} if self.collapse else ident

    def generate(self, prompts: list[str], seeds: list[int], labels: list[int],
                 classnames: list[str]) -> list[np.ndarray]:
        n = len(seeds)
        if not (len(prompts) == len(labels) == len(classnames) == n):
            raise ValueError(
                f"ShapesGenerator.generate: prompts, seeds, labels and classnames must have equal "
                f"lengths, got {len(prompts)}, {n}, {len(labels)}, {len(classnames)}"
            )
        return [render(c, s, self.gap, self.resolution, self.collapse)
                for c, s in zip(classnames, seeds)]
