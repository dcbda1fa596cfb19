"""The worker set-up hook of a local Ray regft started (regft.raylocal explains why it exists).

A module of its own that imports nothing but Ray: Ray runs the hook in every worker process it
starts, before the process's first task, so whatever this module imports every Ray Data task of
every trial imports too. In regft.raylocal it imported torch with Ray Train, seconds in each of
the dozen processes of a smoke trial (benchmarks/RESULTS.md, "A trial's phases").
"""
from __future__ import annotations

import os

import ray


def pin_ray_address() -> None:
    """Runs in every worker process of a local Ray we started (runtime_env set-up hook)."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
