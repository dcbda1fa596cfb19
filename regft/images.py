"""Image files and codecs, one copy for the package (assembly ring: PIL and numpy, no Ray).

- `IMAGE_EXTS` / `image_files`: which files count as images when a folder is given (real splits,
  `regft.predict`).
- `encode_png` / `decode_image`: the dataset store's codec (PNG bytes in parquet shards).
- `load_rgb`: an image file as an RGB PIL image (real splits).
- `resize`: square bicubic resize of generated images before they are stored.
- `as_pil`: anything a user may hand to a model (path, bytes, uint8 array, PIL image) as RGB PIL,
  with a `UserError` naming the image when it cannot be read.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regft.errors import UserError

IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
ARRAY_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA (H, W, C) arrays as_pil accepts


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
    with Image.open(path) as img:
        return img.convert("RGB")


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
            raise UserError(f"image {image}: no such file")
        try:
            return load_rgb(image)
        except OSError as e:  # PIL.UnidentifiedImageError, truncated files
            raise UserError(f"image {image}: cannot be read as an image ({e})") from e
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(image))) as img:
                return img.convert("RGB")
        except OSError as e:
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
