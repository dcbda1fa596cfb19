"""The worker-side train stream (`ingest: worker`): each Ray Train worker reads the train split
itself and decodes + augments its share with torch DataLoader processes on its own CPUs, as the
plain loop does. Plain torch + PIL + pyarrow, no Ray: unit-tested in one process.

Why it exists: on a small machine the Ray Data pipeline (a coordinator, shuffle and decode tasks,
the object store) competes with the training thread for the same cores, and a one-worker run
reached about half the plain loop's images/s while the plain loop's epochs run inside a Train
worker at its full speed (benchmarks/RESULTS.md, "Ray Train, 1 worker, against the plain loop").

The stream is a function of (seed, epoch) only, not of the world size, the number of loader
processes or where a run was resumed:
- epoch e's order is one seeded permutation of the split's rows (the store holds them in
  item_id order, which is class-major, so the permutation is global);
- step s takes rows [s*B, (s+1)*B) of it (B = the global batch), rank r the r-th of the `world`
  equal slices of that step: the steps' global batches are the same at every world size; the
  permutation's tail short of a whole step is dropped, so every rank takes the same steps;
- each row's augmentation draws from its own seed, a function of (seed, epoch, row), so it does
  not depend on which process decoded it.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from regft import store as st
from regft.engine import to_uint8
from regft.errors import UserError
from regft.images import decode_image

# the share of a node's available memory that its workers' copies of the train split may take:
# the rest is for the model, its activations and the decode processes' working memory
SPLIT_MEMORY_SHARE = 0.7
GB = 1e9

# the streams' seed domains, so that the permutation and the augmentations never share a seed
PERMUTATION_STREAM = 0
AUGMENT_STREAM = 1


def _seed(*words: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence hashes them; any change of a word gives
    an unrelated seed)."""
    high, low = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return ((int(high) << 32) | int(low)) & ((1 << 63) - 1)


def available_memory_bytes() -> int | None:
    """Memory this process's node (or container) can still give now: the kernel's MemAvailable,
    capped by the cgroup v2 limit's headroom; None where neither can be read (not Linux)."""
    def read(path: str) -> str | None:
        try:
            with open(path) as f:
                return f.read()
        except OSError:
            return None
    found = []
    meminfo = read("/proc/meminfo") or ""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            found.append(int(line.split()[1]) * 1024)
    limit, used = read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")
    if limit and used and limit.strip().isdigit() and used.strip().isdigit():
        found.append(max(0, int(limit) - int(used)))
    return min(found) if found else None


def split_memory_problem(split_bytes: float, workers_on_node: int, available: int | None) -> str | None:
    """Why the worker ingest cannot hold the train split here, or None: each worker keeps the
    whole split's encoded images in memory (`workers_on_node` copies on this node)."""
    need = split_bytes * workers_on_node
    if available is None or need <= SPLIT_MEMORY_SHARE * available:
        return None
    copies = f" x {workers_on_node} workers" if workers_on_node > 1 else ""
    return (f"ingest worker: the train split in memory ({split_bytes / GB:.1f} GB{copies}) would "
            f"pass {SPLIT_MEMORY_SHARE:.0%} of the {available / GB:.1f} GB this node has "
            f"available: use --ingest ray_data (it streams the split) or fewer workers per node")


def read_train_split(dataset_path: str, val_fraction: float, columns: list[str], *,
                     workers_on_node: int, available: int | None) -> pa.Table:
    """The train split's `columns` as one table, for a worker to hold; refused (UserError) before
    anything is read when `workers_on_node` copies would not fit in `available` bytes (an
    out-of-memory kill would say nothing of the cause)."""
    split_bytes = st.split_disk_bytes(dataset_path, "train", val_fraction)
    problem = split_memory_problem(split_bytes, workers_on_node, available)
    if problem:
        raise UserError(problem)
    return st.read_table(dataset_path, "train", val_fraction, columns=columns)


def epoch_order(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the split's rows that epoch `epoch` reads."""
    generator = torch.Generator().manual_seed(_seed(PERMUTATION_STREAM, seed, epoch))
    return torch.randperm(n_rows, generator=generator)


def rank_steps(n_rows: int, seed: int, epoch: int, *, steps: int, batch_per_rank: int, rank: int,
               world: int) -> list[list[tuple[int, int]]]:
    """Rank `rank`'s batches of epoch `epoch`: per step, its (epoch, row) pairs."""
    step_rows = batch_per_rank * world
    if steps * step_rows > n_rows:
        raise ValueError(f"{steps} steps of {step_rows} rows need {steps * step_rows} rows; "
                         f"the split has {n_rows}")
    order = epoch_order(n_rows, seed, epoch)[: steps * step_rows].view(steps, world, batch_per_rank)
    return [[(epoch, int(i)) for i in order[s, rank]] for s in range(steps)]


class EpochBatches(torch.utils.data.Sampler):
    """A DataLoader's batch sampler over one rank's steps, epoch by epoch (`set_epoch`): it runs in
    the loader's own process, so persistent decode processes serve every epoch."""

    def __init__(self, n_rows: int, seed: int, *, steps: int, batch_per_rank: int, rank: int,
                 world: int):
        self.n_rows, self.seed, self.steps = n_rows, seed, steps
        self.batch_per_rank, self.rank, self.world = batch_per_rank, rank, world
        self.epoch = 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(rank_steps(self.n_rows, self.seed, self.epoch, steps=self.steps,
                               batch_per_rank=self.batch_per_rank, rank=self.rank, world=self.world))


class AugmentedRows(torch.utils.data.Dataset):
    """The train split's rows (an Arrow table with `image` PNG bytes and `label`) as
    (uint8 (3, H, W), label) items, read by (epoch, row) and augmented from that pair's seed.

    The table's buffers are shared by forked loader processes without copying."""

    def __init__(self, table: pa.Table, pil: Callable, seed: int):
        self.images = table.column("image")
        self.labels = np.asarray(table.column("label").to_numpy(), dtype=np.int64)
        self.pil, self.seed = pil, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, row = key
        # torchvision's random transforms draw from torch's default CPU generator. In a loader
        # process nothing else uses it; in the training process (no loader processes) its state
        # is restored around the batch (`RankStream.epoch`). Not torch.manual_seed: it also seeds
        # every accelerator backend, per row.
        torch.default_generator.manual_seed(_seed(AUGMENT_STREAM, self.seed, epoch, row))
        image = to_uint8(self.pil(decode_image(self.images[row].as_py())))
        return image, int(self.labels[row])


def _collate(items: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([i for i, _ in items]), torch.tensor([y for _, y in items], dtype=torch.int64)


class RankStream:
    """One rank's train stream, epoch by epoch: `epoch(e)` yields its (uint8 images, labels)
    batches. `loader_workers` decode processes (0: decode in this process)."""

    def __init__(self, table: pa.Table, pil: Callable, seed: int, *, steps: int, batch_per_rank: int,
                 rank: int = 0, world: int = 1, loader_workers: int = 1, prefetch: int = 4):
        self.rows = AugmentedRows(table, pil, seed)
        self.sampler = EpochBatches(len(self.rows), seed, steps=steps, batch_per_rank=batch_per_rank,
                                    rank=rank, world=world)
        extra = {"persistent_workers": True, "prefetch_factor": prefetch} if loader_workers else {}
        # its own generator: a loader draws its processes' base seed when iterated, and from
        # torch's default generator otherwise (the training process's stream, left alone)
        self.loader = torch.utils.data.DataLoader(self.rows, batch_sampler=self.sampler,
                                                  num_workers=loader_workers, collate_fn=_collate,
                                                  generator=torch.Generator().manual_seed(seed),
                                                  **extra)
        self.in_process = loader_workers == 0

    def epoch(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        if not self.in_process:
            yield from self.loader
            return
        it = iter(self.loader)
        while True:
            state = torch.default_generator.get_state()
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                torch.default_generator.set_state(state)
            yield batch
