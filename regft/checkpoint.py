"""The checkpoint format of a training run (assembly ring: torch + pyarrow file I/O, no Ray).

    folder/model.pt        the classifier's state dict: torch.load(..., weights_only=True)
    folder/train_state.pt  the latest epoch checkpoint only: optimizer/scheduler/scaler state and
                           the best epoch so far, for resuming (also weights_only-loadable)
    folder/meta.json       regft.reports.CheckpointMeta: epoch, final?, task, model, the report

Ray Train names the folders of one run `checkpoint_<timestamp>` under the run's folder;
`find_epoch` and `find_final` scan them (on any pyarrow filesystem: local, S3, GCS) by their
meta. Nothing here unpickles arbitrary objects.

The retention policy (`Policy`): Ray Train keeps the `keep_best` best checkpoints by
`select_metric` and, on top of them, always the latest one (ray.train.v2 CheckpointManager: "except
for the latest checkpoint"). A resume reads the latest checkpoint's weights and train_state plus the
best epoch's weights, so the optimizer state (AdamW: twice the weights) is needed in the latest
checkpoint only: before it reports the next epoch's checkpoint (by then Train has committed the
last one) and after the final one, the worker drops train_state.pt from every checkpoint it keeps
but the latest committed one (`drop_train_state`). A finished run keeps no optimizer state at all (its
latest checkpoint is the final, ensembled one). `kept_bytes_per_trial` prices this for the plan.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import torch

from regft.reports import CheckpointMeta

MODEL_FILE, STATE_FILE, META_FILE = "model.pt", "train_state.pt", "meta.json"
FOLDER_PREFIX = "checkpoint_"  # Ray Train's checkpoint folder names
# AdamW keeps two fp32 moments (exp_avg, exp_avg_sq) per parameter: twice the fp32 weights
ADAMW_STATE_PER_PARAM_BYTES = 2


@dataclass(frozen=True)
class Policy:
    """What a run keeps: the `keep_best` best checkpoints by select_metric (Train's num_to_keep)
    plus the latest; optimizer state only in the latest epoch checkpoint."""

    keep_best: int = 1

    def __post_init__(self):
        if self.keep_best < 1:  # Ray's num_to_keep must be >= 1
            raise ValueError(f"keep_best must be >= 1, got {self.keep_best}")


def adamw_state_bytes(param_bytes: int) -> int:
    """Bytes of AdamW's state for fp32 weights of `param_bytes` (the step counters aside)."""
    return ADAMW_STATE_PER_PARAM_BYTES * param_bytes


def kept_bytes_per_trial(param_bytes: int, optimizer_bytes: int, policy: Policy = Policy()) -> int:
    """The most checkpoint bytes one trial holds in storage at any moment (`param_bytes`: one
    model.pt; `optimizer_bytes`: one train_state.pt). Between epochs: keep_best weights + the latest
    with its optimizer state, and the previous latest's optimizer state when that one is kept as
    a best (dropped just before the next report); while the next epoch's checkpoint is uploaded,
    before Train deletes the worst one, one more of each. An upper bound:
    a best checkpoint that is also the latest counts twice."""
    steady = (policy.keep_best + 1) * param_bytes + optimizer_bytes
    return steady + param_bytes + optimizer_bytes


def finished_bytes_per_trial(param_bytes: int, policy: Policy = Policy()) -> int:
    """Checkpoint bytes a finished trial leaves: weights only (the final, ensembled checkpoint
    and the best epochs Train still keeps), no optimizer state. An upper bound."""
    return (policy.keep_best + 1) * param_bytes


def save(folder: str, state_dict: dict, meta: CheckpointMeta, train_state: dict | None = None) -> None:
    """Write a checkpoint into `folder` (which exists). `train_state` for epoch checkpoints."""
    torch.save(state_dict, os.path.join(folder, MODEL_FILE))
    if train_state is not None:
        torch.save(train_state, os.path.join(folder, STATE_FILE))
    # default=float: tensor/numpy scalars that reached a report are written as numbers
    text = json.dumps(meta.to_dict(), indent=1, default=float)
    Path(folder, META_FILE).write_text(text, encoding="utf-8")


def load(folder: str) -> tuple[dict, CheckpointMeta]:
    """(state dict, meta) of a checkpoint folder. The weights are read first: a file that holds
    anything but tensors fails there, before any other file is trusted."""
    state = torch.load(os.path.join(folder, MODEL_FILE), map_location="cpu", weights_only=True)
    return state, read_meta(folder)


def read_meta(folder: str) -> CheckpointMeta:
    text = Path(folder, META_FILE).read_text(encoding="utf-8")
    return CheckpointMeta.from_dict(json.loads(text), where=os.path.join(folder, META_FILE))


def load_train_state(folder: str) -> dict:
    return torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=True)


def drop_train_state(fs: pafs.FileSystem, folder: str) -> bool:
    """Delete `folder`'s train_state.pt (on any pyarrow filesystem); True if there was one.
    A folder Train deleted meanwhile is no error: its optimizer state is gone either way."""
    path = f"{folder.rstrip('/')}/{STATE_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    try:
        fs.delete_file(path)
    except OSError:  # object stores raise plain OSError for a key deleted meanwhile
        if fs.get_file_info(path).type == pafs.FileType.File:
            raise
        return False
    return True


def _checkpoints(fs: pafs.FileSystem, run_dir: str) -> Iterator[tuple[str, CheckpointMeta]]:
    """(path, meta) of every readable checkpoint folder directly under `run_dir`, in name
    (= time) order. Folders without a readable meta (a checkpoint being written, a partial
    upload) are skipped."""
    infos = fs.get_file_info(pafs.FileSelector(run_dir.rstrip("/"), allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(FOLDER_PREFIX):
            continue
        try:
            with fs.open_input_stream(f"{info.path}/{META_FILE}") as f:
                data = json.loads(f.read().decode("utf-8"))
            yield info.path, CheckpointMeta.from_dict(data, where=f"{info.path}/{META_FILE}")
        except (OSError, ValueError):
            continue


def find_epoch(fs: pafs.FileSystem, run_dir: str, epoch: int) -> str | None:
    """The path of the (non-final) checkpoint of `epoch` under `run_dir`, or None."""
    return next((p for p, meta in _checkpoints(fs, run_dir) if meta.epoch == epoch and not meta.final),
                None)


def find_final(fs: pafs.FileSystem, run_dir: str) -> str | None:
    """The path of the newest final (ensembled) checkpoint under `run_dir`, or None."""
    finals = [p for p, meta in _checkpoints(fs, run_dir) if meta.final]
    return finals[-1] if finals else None


def load_weights(fs: pafs.FileSystem, folder: str) -> dict:
    """The state dict of a checkpoint folder on `fs` (weights_only)."""
    with fs.open_input_stream(f"{folder}/{MODEL_FILE}") as f:
        data = f.read()
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
