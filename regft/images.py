"""Image files and codecs, one copy for the package (assembly ring: PIL and numpy, no Ray).

- `IMAGE_EXTS` / `image_files`: which files count as images when a folder is given (real splits,
  `regft.predict`).
- `encode_png` / `decode_image`: the dataset store's codec (PNG bytes in parquet shards).
- `load_rgb`: an image file as an RGB PIL image (real splits), a UserError naming it otherwise.
- `unreadable_images`: which files of a list cannot be decoded (real splits, before any work).
- `resize`: square bicubic resize of generated images before they are stored.
- `as_pil`: anything a user may hand to a model (path, bytes, uint8 array, PIL image) as RGB PIL,
  with a `UserError` naming the image when it cannot be read.
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regft.cli import shorten
from regft.errors import UserError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
ARRAY_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (H, W, C) arrays as_pil accepts
# what PIL raises for a file it cannot decode: OSError (UnidentifiedImageError, truncated data)
# and DecompressionBombError (more than twice MAX_IMAGE_PIXELS; not an OSError)
UNREADABLE = (OSError, Image.DecompressionBombError, SyntaxError)
ERROR_CHARS = 120  # of PIL's message, quoted in ours
PATH_CHARS = 120  # of a path quoted in an error (its end: the file name)
CHECK_DRAFT_PX = 64  # JPEGs are check-decoded at about this size (draft mode: 1/2..1/8 scale)
CHECK_THREADS = 16  # decoding threads of unreadable_images
CHECK_CHUNK = 64  # paths handed to a thread at a time


def plain(text: str, limit: int) -> str:
    """`text` as it is when short and printable, else cli.shorten's bounded, escaped form."""
    return text if len(text) <= limit and text.isprintable() else shorten(text, limit)


def short_path(path: str | os.PathLike, limit: int = PATH_CHARS) -> str:
    """A path for an error message: as it is, or its end (the file name matters most) when long;
    control characters escaped (cli.shorten)."""
    text = str(path)
    if len(text) <= limit and text.isprintable():
        return text
    return "…" + shorten(text[-limit:], limit).strip("'\"")


def image_files(folder: str | Path) -> list[Path]:
    """Every image file (by extension, IMAGE_EXTS) anywhere below `folder`, sorted as paths."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB; a file PIL cannot decode (or a decompression bomb: more pixels than
    PIL.Image.MAX_IMAGE_PIXELS allows) is a UserError naming it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise UserError(f"image {short_path(path)}: no such file") from None
    except UNREADABLE as e:  # PIL.UnidentifiedImageError, truncated files, bombs
        raise UserError(f"image {short_path(path)}: cannot be read as an image "
                        f"({plain(str(e), ERROR_CHARS)})") from e


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be decoded (None: it can). Really decodes it, at reduced scale where
    the codec allows (JPEG's draft mode decodes 1/8 of the pixels), so a truncated or corrupt
    file is found, not only a wrong header; bombs are refused from the header alone."""
    try:
        with Image.open(path) as img:
            img.draft("RGB", (CHECK_DRAFT_PX, CHECK_DRAFT_PX))
            img.load()
        return None
    except (*UNREADABLE, ValueError) as e:
        return plain(str(e) or type(e).__name__, ERROR_CHARS)


def unreadable_images(paths: list[str], workers: int | None = None) -> list[tuple[str, str]]:
    """[(path, reason)] of the files in `paths` that cannot be decoded, in `paths` order. Decoding
    runs on threads (PIL releases the GIL while decoding): a 50,000-image split takes about a
    minute on 4 cores, once, before hours of training."""
    workers = workers or min(CHECK_THREADS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(unreadable_reason, paths, chunksize=CHECK_CHUNK))
    return [(p, r) for p, r in zip(paths, reasons) if r is not None]


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square bicubic resize (docs/method.md: 512 px generations saved at 224 px, bicubic)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))


def as_pil(image) -> Image.Image:
    """A path, encoded bytes, uint8 array (H, W[, C]) or PIL image -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise UserError(f"image {short_path(image)}: no such file")
        return load_rgb(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(image))) as img:
                return img.convert("RGB")
        except UNREADABLE as e:
            raise UserError(f"image bytes ({len(image)} B): cannot be decoded ({e})") from e
    if isinstance(image, np.ndarray) or torch.is_tensor(image):
        arr = np.asarray(image)
        channels_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in ARRAY_CHANNELS)
        if arr.dtype != np.uint8 or not channels_ok:
            raise UserError(f"image array: expected uint8 (H, W), (H, W, 3) or (H, W, 4), got "
                            f"{arr.dtype} {arr.shape}")
        return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).convert("RGB")
    raise UserError(f"image: expected a path, bytes, a uint8 array or a PIL image, got "
                    f"{type(image).__name__}")
