"""Connect to a Ray cluster or start a private local one, the same way in every entry point.

Why a module of its own: several Ray instances on one machine (two users, a test next to a
benchmark) break Ray internals that look a cluster up by scanning the machine's processes
instead of asking their own runtime. Ray Train's placement-group cleaner does that through the
state API and, on "Found multiple active Ray instances", leaks a trial's reservation so the
search waits forever. Every worker of a local Ray we start therefore pins RAY_ADDRESS to its
own cluster in a worker set-up hook (regft.rayhook), which Ray's address lookup reads first.

The local Ray is reachable from this machine only: its token auth is off, so every one of its
servers (GCS, raylet, agents, each worker's) must listen on the loopback interface. Ray binds
loopback when its node IP is 127.0.0.1, but `ray.init` replaces a loopback `_node_ip_address`
with the machine's routable IP unless Ray runs in its single-machine mode (its default on macOS
and Windows, `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read once when Ray is imported); the driver
is put in that mode while it starts the node, and every process it starts gets 127.0.0.1 from it.
One more server runs inside Ray's processes: the TCPStore of torch.distributed that rank 0 of
each Train run hosts for its process group. torch binds it to every interface whatever its host
is; LoopbackTorchConfig (the trainers' TorchConfig) hands it a socket bound to that host instead
when the host is a loopback address, as on this node.
"""
from __future__ import annotations

import contextlib
import importlib
import ipaddress
import json
import os
import socket
from pathlib import Path

import ray  # this module exists to start Ray: only orchestration code imports it
from ray._private import ray_constants
from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

from regft import store
from regft.cli import shorten

LOOPBACK = "127.0.0.1"
SINGLE_MACHINE_SWITCH = "ENABLE_RAY_CLUSTER"  # ray_constants' copy of the env var above

SETUP_HOOK = "regft.rayhook.pin_ray_address"  # a module that imports only Ray (see there)


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


# ------------------------------------------------- torch.distributed's store on loopback ----

def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_store(create):
    """torch's store factory, with rank 0's server listening on its (loopback) host only."""
    def create_store(hostname, port, rank, world_size, timeout, use_libuv=True):
        if rank != 0 or not _is_loopback_host(hostname):
            return create(hostname, port, rank, world_size, timeout, use_libuv)
        from torch.distributed import TCPStore

        listener = socket.create_server((hostname, port))
        return TCPStore(host_name=hostname, port=port, world_size=world_size, is_master=True,
                        timeout=timeout, multi_tenant=True, master_listen_fd=listener.detach(),
                        use_libuv=use_libuv)
    create_store.regft_loopback = True
    return create_store


def bind_torch_store_to_loopback() -> None:
    """In a Train worker, before its process group is made: torch's rendezvous (env:// and
    tcp://, what Ray Train uses) creates its store through `_create_c10d_store`."""
    # (the module: `torch.distributed.rendezvous` the attribute is a function of that name)
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    create = getattr(rendezvous, "_create_c10d_store", None)
    if create is not None and not getattr(create, "regft_loopback", False):
        rendezvous._create_c10d_store = _loopback_store(create)


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config):
        worker_group.execute(bind_torch_store_to_loopback)
        super().on_start(worker_group, backend_config)


class LoopbackTorchConfig(TorchConfig):
    """Ray Train's TorchConfig whose process-group store stays on a loopback host (above)."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


# ------------------------------------------------------- outputs of a submitted job ----

JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # Ray's job supervisor sets it for a job's driver
JOB_RESOURCES_DIR = "runtime_resources"  # Ray's per-session folder of unpacked working dirs
HOME_ENV = "REGFT_HOME"
DEFAULT_HOME = "~/.regft"  # where regft keeps its per-user state already (Optuna studies, logs)


def job_working_dir(cwd: Path | None = None) -> Path | None:
    """The folder this process runs in when it is the driver of a Ray job whose working dir Ray
    unpacked (`ray job submit --working-dir`): a temporary copy that Ray deletes with its
    session. None when not a job, or a job run in a folder of the user's."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    cwd = (cwd or Path.cwd()).resolve()
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):  # not Ray's JSON: the folder's shape still tells
        runtime_env = {}
    unpacked = JOB_RESOURCES_DIR in cwd.parts
    return cwd if unpacked or (isinstance(runtime_env, dict) and runtime_env.get("working_dir")) else None


def durable_home() -> Path:
    """Where a submitted job's outputs go by default: $REGFT_HOME, else ~/.regft (on the node
    that runs the job's driver: the head, for `ray job submit`)."""
    return Path(os.environ.get(HOME_ENV) or DEFAULT_HOME).expanduser().resolve()


def outputs_dir() -> Path:
    """regft's folder for outputs without a storage root of their own (the export of a search
    whose storage is a URI): ./.regft, or durable_home() in a submitted job."""
    return durable_home() if job_working_dir() else Path.cwd() / ".regft"


def _local_path(uri: str) -> Path | None:
    """The file or folder a local path, file: or sqlite: URI names; None for a remote one."""
    for prefix in ("file://", "sqlite:///"):
        if uri.startswith(prefix):
            return Path(uri[len(prefix):])
    return None if store.is_uri(uri) else Path(uri).expanduser()


def job_outputs(storage: str, tracking_uri: str | None) -> tuple[str, str | None, list[str]]:
    """(--storage, --tracking-uri, problems) for this process. In a submitted job whose working
    dir is Ray's temporary copy, a relative --storage (the default regft_runs included) and the
    default MLflow store (no --tracking-uri, no $MLFLOW_TRACKING_URI) go to durable_home();
    a storage or sqlite store given inside the copy is refused. Elsewhere: as given."""
    pkg = job_working_dir()
    if pkg is None:
        return storage, tracking_uri, []
    home, moved = durable_home(), []
    if not store.is_uri(storage) and not Path(storage).expanduser().is_absolute():
        storage, moved = str(home / storage), [f"--storage {storage}"]
    if tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
        tracking_uri, moved = f"sqlite:///{home / 'mlflow.db'}", [*moved, "the MLflow store"]
    problems = []
    for flag, value in (("--storage", storage),
                        ("--tracking-uri", tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))):
        path = _local_path(value) if value else None
        if path is not None and path.resolve().is_relative_to(pkg):
            problems.append(
                f"{flag} {shorten(value, 80)}: inside this Ray job's working dir, a temporary copy "
                f"Ray deletes with its session; give a folder or database outside it (default "
                f"for a job: ${HOME_ENV}, else {DEFAULT_HOME}) or a URI (s3://..., http://...)")
    if moved and not problems:
        home.mkdir(parents=True, exist_ok=True)  # the sqlite store's folder must exist
        print(f"note: running as a Ray job in a temporary working dir: writing {' and '.join(moved)} "
              f"under {home} (${HOME_ENV}) on this node instead, which outlives the job")
    return storage, tracking_uri, problems
