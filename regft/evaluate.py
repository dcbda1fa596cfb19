"""Re-check a searched model: `python -m regft.evaluate MODEL [--real-test PATH]`

    python -m regft.evaluate regft_runs/exports/shapes-smoke-20261123-131816
    python -m regft.evaluate models:/regft-cars/3 --real-test ~/data/stanford_cars --json

Top-1 accuracy of the exported (ensembled) model on a real test split, computed the way the
training run computed the number it logged (same eval transform, uint8 crop then normalise, same
batch size, fp32 on CPU), and compared with that logged number (`ens_real_test_acc` in the
export, also the search's `best/ens_real_test_acc` in MLflow). `--real-test` defaults to the
split the run was evaluated on. Exit 0 when the logged number is reproduced exactly (or none
was logged for this split), 1 when it is not, 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import tempfile

import torch

from regft import engine
from regft.cli import entry_point, shorten
from regft.errors import UserError
from regft.export import load_export, section
from regft.realdata import open_real_split, unreadable_problems
from regft.registry import resolve_model
from regft.tasks import Task

# The eval batch size for an export that recorded none (written by export.export_checkpoint, not
# by a search): TrainConfig.eval_batch_size's default, restated because regft.train imports Ray.
UNRECORDED_EVAL_BATCH_SIZE = 256


def task_of(meta: dict) -> Task:
    """The Task the export was trained for (class names in label order), for label mapping."""
    t = section(meta, "task")
    gen = t.generation_classnames
    return Task(name=t.name or "exported", classnames=tuple(meta["classnames"]),
                generation_classnames=tuple(gen) if len(gen) == len(meta["classnames"]) else (),
                real_test=t.real_test, source="export")


def _plain(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit and text.isprintable() else shorten(text, limit)


def check_device(device: str) -> str:
    """`--device` as torch reads it, refused unless this machine has it (no CUDA build or GPU, a
    GPU index past the last one, a name torch does not know)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {_plain(device)}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {_plain(device)}: this machine has no CUDA GPU (or torch "
                            "was built without CUDA); use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise UserError(f"--device {_plain(device)}: this machine has {count} CUDA GPU(s), "
                            f"cuda:0..cuda:{count - 1}")
    elif dev.type != "cpu":
        raise UserError(f"--device {_plain(device)}: regft.evaluate runs on cpu or cuda[:N]")
    return str(dev)


def evaluate_export(model, real_test: str, batch_size: int, device: str = "cpu") -> dict:
    """{"correct", "total", "accuracy"} of a loaded export on a real test split (every image is
    checked readable first: a bad one is named, not a traceback half-way)."""
    dataset = open_real_split(task_of(model.meta), real_test, "test", model.transform.to_uint8)
    if dataset is None or len(dataset) == 0:
        raise UserError(f"--real-test {real_test}: no images")
    problems = unreadable_problems(dataset, f"--real-test {real_test}")
    if problems:
        raise UserError(problems)
    module = model.module.to(torch.device(device))
    batches = engine.EvalSet(dataset, None, batch_size, cache=False).batches(
        device, model.transform.mean, model.transform.std)
    res = engine.evaluate(module, batches, keep_features=False)
    return {"correct": res.correct, "total": res.total, "accuracy": res.acc}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m regft.evaluate",
                                description="Evaluate a searched (exported) model on a real test "
                                            "split and compare with the number logged for it.")
    p.add_argument("model", help="export folder, MLflow run id, or models:/NAME/VERSION")
    p.add_argument("--real-test", help="real test split (torchvision root, ImageFolder, CSV, CoOp "
                   "json, shapes:real); default: the split the run reported")
    p.add_argument("--batch-size", type=int, help="default: the run's eval batch size")
    p.add_argument("--device", default="cpu", help="cpu (default; how the logged numbers are "
                   "reproduced for CPU runs) or cuda")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for run ids / models:/")
    return p


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    device = check_device(args.device)  # the flags first: seconds before the model is fetched
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    with tempfile.TemporaryDirectory(prefix="regft-model-") as tmp:
        folder = resolve_model(args.model, args.tracking_uri, tmp)
        model = load_export(folder)
    meta = model.meta
    recorded = section(meta, "evaluation")
    real_test = args.real_test or recorded.real_test
    if not real_test:
        raise UserError(f"MODEL {args.model}: the run reported no real test split; give "
                        "--real-test PATH")
    batch_size = args.batch_size or recorded.eval_batch_size or UNRECORDED_EVAL_BATCH_SIZE
    result = evaluate_export(model, real_test, batch_size, device)
    logged = meta.get("metrics", {}).get("ens_real_test_acc")
    same_split = real_test == recorded.real_test
    out = {"model": str(args.model), "real_test": real_test, **result, "alpha": meta["alpha"],
           "logged_accuracy": logged if same_split else None,
           "mlflow_run_id": section(meta, "mlflow").run_id,
           "reproduced": (result["accuracy"] == logged) if same_split and logged is not None else None}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} (alpha {meta['alpha']:.2f}) on --real-test {real_test}: accuracy "
              f"{result['accuracy']:.4f} ({result['correct']}/{result['total']})")
        if out["reproduced"] is not None:
            verdict = "reproduced exactly" if out["reproduced"] else "DIFFERS"
            print(f"logged for this model (ens_real_test_acc, MLflow run {out['mlflow_run_id']}): "
                  f"{logged:.4f}: {verdict}")
        elif not same_split:
            print(f"(the run reported on {recorded.real_test!r}; nothing logged to compare with)")
    return 1 if out["reproduced"] is False else 0


def main(argv: list[str] | None = None) -> int:
    return entry_point(_main)(argv)


if __name__ == "__main__":
    raise SystemExit(main())  # the error classes live in regft.errors: one copy even under -m
