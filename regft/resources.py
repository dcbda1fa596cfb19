"""Cluster capacity and the checks that a training run (or a search's trial) can ever start on it.

Why these checks exist: Ray Train and Ray Tune wait, without an error, for resources a cluster will
never have. A run asks for `num_workers x cpus_per_worker` CPUs (and GPUs when `use_gpu`) plus
`DATA_CPUS` left free for its Ray Data input pipeline (without them the workers wait forever for
batches), or, when each worker decodes its own share (`ingest: worker`), `loader_workers` more
CPUs per worker for its decode processes; a search trial adds the CPU of the Tune function that
drives its TorchTrainer. The trial check is the training check with that extra CPU and the
search's flag names in its messages.

A capacity is the dict `cluster_capacity()` returns: `cpus`/`gpus` (whole cluster),
`node_cpus`/`node_gpus` (the largest alive node) and `nodes` (alive nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from regft import store

DATA_CPUS = 1.0  # CPUs Ray Data needs free to read/decode/augment while the workers train
TRIAL_DRIVER_CPU = 0.01  # the Tune function that drives a trial's TorchTrainer only waits


@dataclass(frozen=True)
class Vocabulary:
    """How a caller names the settings the checks read, so every message names the user's flag."""

    unit: str  # what could never start: "run" or "trial"
    workers: str
    cpus_per_worker: str
    loader_workers: str
    gpus: str
    no_gpu_fix: str


TRAIN_WORDS = Vocabulary("run", "num_workers", "cpus_per_worker", "loader_workers", "use_gpu",
                         "drop --use-gpu to train on CPU")
TRIAL_WORDS = Vocabulary("trial", "--workers-per-trial", "--cpus-per-worker", "--loader-workers",
                         "--gpus-per-trial",
                         "drop the flag to train on CPU, or connect to a GPU cluster with --address")


def cluster_capacity() -> dict[str, float]:
    # the checks below are pure (a dict in, problems out); only reading the cluster needs Ray
    import ray

    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    return {"cpus": float(total.get("CPU", 0)), "gpus": float(total.get("GPU", 0)),
            "node_cpus": max((float(r.get("CPU", 0)) for r in nodes), default=0.0),
            "node_gpus": max((float(r.get("GPU", 0)) for r in nodes), default=0.0)}


def ray_data_cpus(cfg) -> float:
    """CPUs a run needs free beside its workers for its Ray Data input pipeline (none when each
    worker decodes its own share: `ingest: worker`)."""
    return DATA_CPUS if cfg.ingest == "ray_data" else 0.0


def worker_data_cpus(cfg) -> float:
    """CPUs each worker holds for its own decode processes (`ingest: worker`), beside
    cpus_per_worker for training."""
    return float(cfg.loader_workers) if cfg.ingest == "worker" else 0.0


def worker_cpus(cfg) -> float:
    """CPUs one Train worker holds (Ray's resources_per_worker)."""
    return cfg.cpus_per_worker + worker_data_cpus(cfg)


def training_cpus(cfg) -> float:
    """CPUs one training run holds: its Train workers and the CPUs its input pipeline needs free."""
    return cfg.num_workers * worker_cpus(cfg) + ray_data_cpus(cfg)


def trial_cpus(cfg) -> float:
    """CPUs one search trial holds: its training run and the waiting trial driver."""
    return training_cpus(cfg) + TRIAL_DRIVER_CPU


def training_gpus(cfg) -> float:
    return cfg.num_workers * cfg.gpus_per_worker if cfg.use_gpu else 0.0


def check_resources(cfg, capacity: dict[str, float], words: Vocabulary = TRAIN_WORDS,
                    extra_cpus: float = 0.0) -> list[str]:
    """Problems that would make Ray Train wait forever for workers (or Ray Data for CPUs).

    `cfg` is a `regft.train.TrainConfig` (num_workers, cpus_per_worker, use_gpu, gpus_per_worker);
    `extra_cpus` are CPUs the caller holds besides the run (a trial's driver)."""
    p = []
    if cfg.use_gpu:
        gpus = training_gpus(cfg)
        if capacity["gpus"] <= 0:
            p.append(f"{words.gpus}: the Ray cluster has no GPUs ({words.no_gpu_fix})")
        elif cfg.gpus_per_worker > capacity["node_gpus"]:
            p.append(f"{words.gpus}: {cfg.num_workers} worker(s) need {cfg.gpus_per_worker:g} GPU "
                     f"each, but the largest node has {capacity['node_gpus']:g}")
        elif gpus > capacity["gpus"]:
            p.append(f"{words.gpus}: {cfg.num_workers} worker(s) x {cfg.gpus_per_worker:g} GPU need "
                     f"{gpus:g} GPUs; the cluster has {capacity['gpus']:g} (lower {words.workers})")
    loaders = worker_data_cpus(cfg)
    per_worker = f"{cfg.cpus_per_worker:g}" + (f" + {loaders:g} for its decode processes" if loaders else "")
    if worker_cpus(cfg) > capacity["node_cpus"]:
        p.append(f"{words.cpus_per_worker} {per_worker}: the largest node has "
                 f"{capacity['node_cpus']:g} CPUs")
    need = training_cpus(cfg) + extra_cpus
    if need > capacity["cpus"]:
        data = f" + {ray_data_cpus(cfg):g} CPU for Ray Data" if ray_data_cpus(cfg) else ""
        driver = f" + {extra_cpus:g} for the trial's driver" if extra_cpus else ""
        fix = f"{words.loader_workers}, " if loaders else ""
        p.append(f"{words.workers} {cfg.num_workers} x {words.cpus_per_worker} "
                 f"{per_worker}{data}{driver} needs {need:g} "
                 f"CPUs; the cluster has {capacity['cpus']:g}: the {words.unit} could never start "
                 f"(lower {fix}{words.workers} or {words.cpus_per_worker}, e.g. 0.5)")
    return p


def check_trial_resources(cfg, capacity: dict[str, float]) -> list[str]:
    """The training check for one search trial: its driver's CPU added, messages in flag names."""
    return check_resources(cfg, capacity, TRIAL_WORDS, extra_cpus=TRIAL_DRIVER_CPU)


def max_concurrent_trials(cfg, capacity: dict[str, float], num_samples: int,
                          limit: int | None = None) -> int:
    """Trials of training config `cfg` the cluster holds at once (at least 1, at most
    `num_samples`, at most `limit` when given)."""
    limits = [math.floor(capacity["cpus"] / trial_cpus(cfg))]
    if cfg.use_gpu:
        limits.append(math.floor(capacity["gpus"] / training_gpus(cfg)))
    n = max(1, min(limits))
    if limit:
        n = min(n, limit)
    return min(n, num_samples)


def check_shared_storage(storage: str) -> list[str]:
    """On a multi-node cluster every node writes shards and checkpoints under --storage, and the
    driver reads them back: a local path there is a different folder on each node."""
    import ray  # reading the cluster needs Ray (see cluster_capacity)

    if store.is_uri(storage):  # s3://, gs://, ... or file:// (the user's word that it is shared)
        return []
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) <= 1:
        return []
    return [f"--storage {storage}: a local path, but the Ray cluster has {len(nodes)} nodes, which "
            "cannot see each other's disks; pass shared storage, e.g. --storage s3://BUCKET/regft "
            "(or a filesystem mounted at the same path on every node, as file:///mnt/shared/regft)"]
