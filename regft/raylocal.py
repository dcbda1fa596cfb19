"""Connect to a Ray cluster or start a private local one, the same way in every entry point.

Why a module of its own: several Ray instances on one machine (two users, a test next to a
benchmark) break Ray internals that look a cluster up by scanning the machine's processes
instead of asking their own runtime. Ray Train's placement-group cleaner does that through the
state API and, on "Found multiple active Ray instances", leaks a trial's reservation so the
search waits forever. Every worker of a local Ray we start therefore pins RAY_ADDRESS to its
own cluster in a worker set-up hook, which Ray's address lookup reads first.

The local Ray is reachable from this machine only: its token auth is off, so every one of its
servers (GCS, raylet, agents, each worker's) must listen on the loopback interface. Ray binds
loopback when its node IP is 127.0.0.1, but `ray.init` replaces a loopback `_node_ip_address`
with the machine's routable IP unless Ray runs in its single-machine mode (its default on macOS
and Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read once when Ray is imported); the driver
is put in that mode while it starts the node, and every process it starts gets 127.0.0.1 from it.
"""
from __future__ import annotations

import contextlib
import os

import ray  # this module exists to start Ray: only orchestration code imports it
from ray._private import ray_constants

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_SWITCH = "ENABLE_RAY_CLUSTER"  # ray_constants' copy of the env var above

SETUP_HOOK = "regft.raylocal.pin_ray_address"


def pin_ray_address() -> None:
    """Runs in every worker process of a local Ray we started (runtime_env set-up hook)."""
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def local_runtime_env() -> dict:
    return {"worker_process_setup_hook": SETUP_HOOK}


@contextlib.contextmanager
def _single_machine_mode():
    """Ray's single-machine mode for this process while the node starts (a new node's IP is
    then the loopback one); a later connection to a real cluster is left as Ray makes it."""
    before = getattr(ray_constants, SINGLE_MACHINE_SWITCH)
    setattr(ray_constants, SINGLE_MACHINE_SWITCH, False)
    try:
        yield
    finally:
        setattr(ray_constants, SINGLE_MACHINE_SWITCH, before)


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
    loopback_only = hasattr(ray_constants, SINGLE_MACHINE_SWITCH)
    if loopback_only:
        # nothing off this machine reaches it (docs/RELIABILITY.md: a shared machine's other
        # users can; they set RAY_AUTH_MODE=token, which this default leaves alone)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # else: a Ray without the switch would listen on every interface: its token auth stays on
    runtime_env = local_runtime_env()
    if not log_to_driver:
        runtime_env["env_vars"] = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    mode = _single_machine_mode() if loopback_only else contextlib.nullcontext()
    with mode:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=dashboard,
                 dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK, runtime_env=runtime_env,
                 **quiet_kw)
    return ray
