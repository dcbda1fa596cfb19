"""Work every trial of a search repeats with the same result, done once and stored with the
search, content-addressed: the zero-shot head (the text tower over the task's prompts), the
decoded evaluation splits, and the zero-shot model's accuracy on each split (alpha 0 is the same
model in every trial).

An entry's name is the sha256 of everything its value depends on, so a resumed or a second
search over the same storage root finds it, and anything that changes the value (other weights,
prompts, classes, dataset, split rule, eval transform, batch size, precision, device type, world
size) changes the name instead of reusing a stale value:

    head/<key>.pt      the zero-shot ClassificationHead's state dict
                       key: the CLIP weights (all of them, text tower included), the texts, device
    decoded/<key>.npz  a split's images after the eval transform's PIL part, uint8 (N, 3, H, W),
                       with labels; key: the split's identity (dataset id + split rule, or the real
                       split's path) and the transform
    zs_acc/<key>.json  {"accuracy": a}: theta_0's accuracy on a split
                       key: theta_0's weights, the decoded split's key, how evaluation runs

Entries are written atomically (temporary name, then a move), and the value written is the one
the trial computed itself, by the code path it would take without sharing, so a trial reading an
entry reports bit-identical numbers (tests/test_shared_work.py). Two trials that compute the same
entry at once write the same bytes. `SharedWork(None)` shares nothing: every call computes.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow.fs as pafs
import torch

from regft import store as st

log = logging.getLogger(__name__)

KINDS = ("head", "decoded", "zs_acc")
# a decoded split is stored only up to this size (as the workers' in-memory eval cache,
# regft.train.EVAL_CACHE_BYTES): bigger ones are decoded by each trial
MAX_DECODED_BYTES = 4 * 2**30


def digest(*parts) -> str:
    """sha256 hex of JSON-able parts (dict keys sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 hex of a state dict: every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class ArraySplit(torch.utils.data.Dataset):
    """A decoded split: (uint8 (3, H, W) tensor, int label) items, as the split's own dataset
    yields them after the eval transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = torch.from_numpy(images), [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


class SharedWork:
    """The search's shared-work folder (local path or URI; None: nothing is shared)."""

    def __init__(self, root: str | None):
        self.root = root

    # ------------------------------------------------------------------ storage --
    def _read(self, kind: str, name: str) -> bytes | None:
        if self.root is None:
            return None
        fs, root = st.filesystem(st.join(self.root, kind, name))
        if fs.get_file_info(root).type != pafs.FileType.File:
            return None
        with fs.open_input_stream(root) as f:
            return f.read()

    def _write(self, kind: str, name: str, data: bytes) -> None:
        if self.root is not None:
            st.write_bytes_atomic(st.join(self.root, kind), name, data)

    # ------------------------------------------------------------------- entries --
    def head(self, key: str, compute: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The zero-shot head of `key` (head_key): read, else `compute()`d and stored."""
        data = self._read("head", f"{key}.pt")
        if data is None:
            head = compute()
            buf = io.BytesIO()
            torch.save(head.state_dict(), buf)
            self._write("head", f"{key}.pt", buf.getvalue())
            return head
        state = torch.load(io.BytesIO(data), weights_only=True)
        head = compute_shell(state)
        head.load_state_dict(state)
        return head

    def decoded(self, key: str, dataset) -> torch.utils.data.Dataset:
        """`dataset` ((uint8 image, label) items) decoded once: the stored ArraySplit of `key`,
        else every item read now and stored (when it fits MAX_DECODED_BYTES)."""
        if self.root is None:
            return dataset
        data = self._read("decoded", f"{key}.npz")
        if data is not None:
            arrays = np.load(io.BytesIO(data))
            return ArraySplit(arrays["images"], arrays["labels"])
        if len(dataset) == 0:
            return dataset
        first = dataset[0][0]
        if len(dataset) * first.numel() * first.element_size() > MAX_DECODED_BYTES:
            return dataset
        items = [dataset[i] for i in range(len(dataset))]
        images = np.stack([np.asarray(im) for im, _ in items])
        labels = np.asarray([int(y) for _, y in items], dtype=np.int64)
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=labels)
        self._write("decoded", f"{key}.npz", buf.getvalue())
        return ArraySplit(images, labels)

    def accuracy(self, key: str, compute: Callable[[], float]) -> float:
        """theta_0's accuracy of `key` (accuracy_key): read, else `compute()`d and stored."""
        data = self._read("zs_acc", f"{key}.json")
        if data is not None:
            return float(json.loads(data)["accuracy"])
        value = float(compute())
        self._write("zs_acc", f"{key}.json", json.dumps({"accuracy": value}).encode())
        return value


def compute_shell(state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """An empty ClassificationHead shaped for `state` (its values are loaded over it)."""
    from regft.zeroshot import ClassificationHead

    return ClassificationHead(torch.zeros_like(state["linear.weight"]))


def head_key(clip_state: Mapping[str, torch.Tensor], texts: list[list[str]], logit_scale: float,
             device_type: str) -> str:
    return digest("head", state_digest(clip_state), texts, repr(float(logit_scale)), device_type)


def split_key(identity: dict, transform: str) -> str:
    """A split's identity (e.g. {"dataset": id, "split": "val", "val_fraction": f}, or a real
    split's path) and the repr of the transform its items went through."""
    return digest("split", identity, transform)


def accuracy_key(theta_0_digest: str, split: str, how: dict) -> str:
    """`how`: everything that changes the counts besides the weights and the split: eval batch
    size, precision, device type, world size."""
    return digest("zs_acc", theta_0_digest, split, how)
