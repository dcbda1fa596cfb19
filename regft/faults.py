"""Test hooks that make a run fail once at a chosen point (assembly ring: stdlib only).

One schema for every hook, passed around as a plain dict (it crosses Ray processes as part of
a task's or trainer's arguments) and read here:

    {"marker": path, "mode": "raise" | "exit" | "disk_full", and one point:
     "after_epoch": n   (regft.train: rank 0, after epoch n's report),
     "item_id": id      (regft.generate: before the batch holding that item is generated),
     "shard": k         (regft.store: while shard k is written; mode disk_full)}

"Once" holds across processes and restarts: the first process to create `marker` (O_EXCL) fires;
every later arrival (a retried task, a restarted worker) finds it and goes on. "raise" raises a
RuntimeError, "exit" kills the process (as a lost node or an OOM kill would), "disk_full" makes
the shard write fail with ENOSPC after writing half the bytes.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass

MODES = ("raise", "exit", "disk_full")
POINTS = ("after_epoch", "item_id", "shard")
# Ray Train's controller collects reports every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S); a report
# not yet collected when its worker dies is lost, and the run would resume from the checkpoint
# before it. A training "exit" waits this long first.
TRAIN_REPORT_COLLECT_S = 5.0


@dataclass(frozen=True, kw_only=True)
class Fault:
    marker: str
    mode: str = "raise"
    after_epoch: int | None = None
    item_id: str | None = None
    shard: int | None = None

    @classmethod
    def from_dict(cls, data: dict) -> Fault:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown or "marker" not in data:
            raise ValueError(f"fault {data}: unknown keys {unknown}" if unknown else
                             f"fault {data}: needs a marker file")
        fault = cls(**data)
        points = [p for p in POINTS if getattr(fault, p) is not None]
        shard_only = points == ["shard"]
        if fault.mode not in MODES or len(points) != 1 or (fault.mode == "disk_full") != shard_only:
            raise ValueError(f"fault {data}: mode one of {MODES} and exactly one of {POINTS} "
                             "(disk_full goes with shard, and only it)")
        return fault


def parse(fault: dict | Fault | None) -> Fault | None:
    return fault if fault is None or isinstance(fault, Fault) else Fault.from_dict(fault)


def fire_once(fault: Fault) -> bool:
    """True for the one caller, in any process, that creates the marker file."""
    try:
        fd = os.open(fault.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _fail(fault: Fault, what: str, exit_delay_s: float = 0.0) -> None:
    if fault.mode == "exit":
        time.sleep(exit_delay_s)
        os._exit(1)
    raise RuntimeError(f"injected fault {what}")


def after_epoch(fault: dict | Fault | None, epoch: int, rank: int) -> None:
    """Training: rank 0 fails once after epoch `fault.after_epoch` (Ray Train then stops the
    whole worker group and, with max_failures, restarts it from the latest checkpoint)."""
    fault = parse(fault)
    if fault and rank == 0 and epoch == fault.after_epoch and fire_once(fault):
        _fail(fault, f"after epoch {epoch}", TRAIN_REPORT_COLLECT_S)


def at_items(fault: dict | Fault | None, item_ids) -> None:
    """Generation: fails once when a batch holds `fault.item_id` (nothing of its shard is kept)."""
    fault = parse(fault)
    if fault and fault.item_id is not None and fault.item_id in item_ids and fire_once(fault):
        _fail(fault, f"at item {fault.item_id}")


def disk_full(fault: dict | Fault | None, shard: int) -> bool:
    """Storage: True once, when shard `fault.shard` is written under a disk_full fault."""
    fault = parse(fault)
    return bool(fault and fault.mode == "disk_full" and fault.shard == shard and fire_once(fault))
