"""Connect to a Ray cluster or start a private local one, the same way in every entry point.

Why a module of its own: several Ray instances on one machine (two users, a test next to a
benchmark) break Ray internals that look a cluster up by scanning the machine's processes
instead of asking their own runtime. Ray Train's placement-group cleaner does that through the
state API and, on "Found multiple active Ray instances", leaks a trial's reservation so the
search waits forever. Every worker of a local Ray we start therefore pins RAY_ADDRESS to its
own cluster in a worker set-up hook, which Ray's address lookup reads first.
"""
from __future__ import annotations

import os

import ray  # this module exists to start Ray: only orchestration code imports it

SETUP_HOOK = "regft.raylocal.pin_ray_address"


def pin_ray_address() -> None:
    """Runs in every worker process of a local Ray we started (runtime_env set-up hook)."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def local_runtime_env() -> dict:
    return {"worker_process_setup_hook": SETUP_HOOK}


def init(address: str | None = None, *, num_cpus: int | None = None, dashboard: bool = True,
         quiet: bool = False, log_to_driver: bool = True):
    """Ray for this process: the given address, else RAY_ADDRESS, else a private local Ray.

    The local Ray's dashboard is on by default because Tune frees a stopped trial's resources
    and Train's cleaner checks actors through the state API it serves; it listens on 127.0.0.1.
    `log_to_driver=False` (regft.console, without --verbose): the workers' output stays in the
    session's logs/worker-*.out|err files instead of being streamed to this process, and Ray
    Data draws no progress bars inside them (nobody watches those).
    """
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    quiet_kw = ({"log_to_driver": False, "configure_logging": False} if quiet
                else {"log_to_driver": log_to_driver})
    if address and address != "local":
        ray.init(address=address, **quiet_kw)
        return ray
    # token auth needs a token file on this machine; a private local Ray has no other users
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    runtime_env = local_runtime_env()
    if not log_to_driver:
        runtime_env["env_vars"] = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
             dashboard_host="127.0.0.1", runtime_env=runtime_env, **quiet_kw)
    return ray
