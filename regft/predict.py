"""Classify images with a searched model: `python -m regft.predict MODEL IMAGE...`

    python -m regft.predict regft_runs/exports/shapes-smoke-20261123-131816 photo.png
    python -m regft.predict models:/regft-shapes/1 photos/ --top-k 3 --json > predictions.jsonl
    python -m regft.predict 3f2a9c...e1 photo.png --tracking-uri sqlite:////abs/mlflow.db

MODEL: an export folder (model.safetensors + regft_model.json, written by regft.tune), an MLflow
run id (the search's parent run: its `regft_model/` artifacts) or `models:/NAME/VERSION` (the
Model Registry; `regft-<task>`). IMAGE: image files or folders (every image below a folder, in
sorted order, with a progress bar). Prints the top-k classes per image; `--json` prints one JSON
object per image per line. The export is verified (sha256, shapes) before anything is predicted.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from regft.cli import entry_point, shorten
from regft.errors import UserError
from regft.export import find_export, load_export
from regft.images import IMAGE_EXTS, image_files


def resolve_model(model: str, tracking_uri: str | None, tmp: str) -> Path:
    """MODEL argument -> a local export folder (regft.registry.resolve_model, downloaded into
    `tmp` when it lives in MLflow). A folder is taken here: predicting from local files then never
    imports MLflow, seconds of start-up it does not need (tests/test_export.py checks)."""
    path = Path(model).expanduser()
    if path.exists():
        return find_export(path)
    from regft.registry import resolve_model as from_mlflow  # MLflow: see the docstring

    return from_mlflow(model, tracking_uri, tmp)


def collect_images(args: list[str]) -> tuple[list[str], bool]:
    """(image paths, whether a folder was given). Folders: every image below them, sorted."""
    images, folder = [], False
    for a in args:
        p = Path(a)
        if p.is_dir():
            folder = True
            found = sorted(str(f) for f in image_files(p))  # sorted as strings, as printed
            if not found:
                raise UserError(f"IMAGE {shorten(a)}: folder has no images "
                                f"({', '.join(sorted(IMAGE_EXTS))})")
            images += found
        elif p.is_file():
            images.append(str(p))
        else:
            raise UserError(f"IMAGE {shorten(a)}: no such file or folder")
    return images, folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m regft.predict",
                                description="Classify images with a searched (exported) model.")
    p.add_argument("model", help="export folder, MLflow run id, or models:/NAME/VERSION")
    p.add_argument("images", nargs="+", help="image files or folders of images")
    p.add_argument("--top-k", type=int, default=3, help="classes to print per image (default 3)")
    p.add_argument("--json", action="store_true", help="one JSON object per image per line")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--tracking-uri", help="MLflow tracking URI for run ids / models:/ "
                   "(default: $MLFLOW_TRACKING_URI, else ./mlflow.db)")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        raise UserError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
    images, folder = collect_images(args.images)
    with tempfile.TemporaryDirectory(prefix="regft-model-") as tmp:
        model = load_export(resolve_model(args.model, args.tracking_uri, tmp))
    k = min(args.top_k, model.num_classes)
    bar = tqdm(total=len(images), unit="img", file=sys.stderr, desc="predict",
               disable=None if (folder or len(images) > args.batch_size) else True)
    try:
        pred = model.predict(images, batch_size=args.batch_size, progress=bar)
    finally:
        bar.close()
    for i, path in enumerate(images):
        top = pred.top_k(i, k, model.classnames)
        if args.json:
            print(json.dumps({"image": path, "label": top[0][0], "probability": top[0][1],
                              "top_k": [{"label": c, "probability": p} for c, p in top]}))
        else:
            print(f"{path}\t" + "\t".join(f"{c} ({p:.4f})" for c, p in top))
    return 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())  # the error classes live in regft.errors: one copy even under -m
