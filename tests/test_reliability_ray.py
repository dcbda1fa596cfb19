"""Issue 19 items 7 and 14: the Ray side of reliability.

- The private local Ray that regft starts (regft.raylocal, token auth off) is not reachable from
  the network: while it works, none of its processes listens outside the loopback interface.
- A search submitted as a Ray job (`ray job submit --working-dir .`) runs in Ray's temporary
  copy of the working dir: its default outputs go to $REGFT_HOME (~/.regft) instead, and outputs
  given inside the copy are refused (exit 2, nothing created). Through a real `ray job submit`:
  tests/test_cluster.py::test_job_submit_runs_the_search_and_logs_mlflow_runs.
"""
from __future__ import annotations

import ipaddress
import json
import os
import time
from pathlib import Path

import pytest

from regft import raylocal
from regft.tune import main

pytestmark = pytest.mark.timeout(300)

LISTEN_SETTLE_S = 1.0  # a worker's gRPC server starts right after the worker itself


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    if getattr(addr, "ipv4_mapped", None):  # ::ffff:127.0.0.1, a dual-stack socket's loopback
        addr = addr.ipv4_mapped
    return addr.is_loopback


def _ray_processes(ray):
    """This process (the driver holds a core worker server) and every process of our own Ray:
    those whose command line names its session folder (GCS, raylet, dashboard, agents), and all
    their descendants (workers rename themselves `ray::...` and drop that folder)."""
    import psutil  # vendored by Ray (ray/thirdparty_files, on sys.path once ray is imported)

    session = ray._private.worker._global_node.get_session_dir_path()
    me = psutil.Process()
    roots = [me]
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != me.pid and session in " ".join(p.info["cmdline"] or ()):
            roots.append(p)
    found = {}
    for root in roots:
        for p in [root, *root.children(recursive=True)]:
            found[p.pid] = p
    return list(found.values())


def _bound_sockets(processes) -> list[tuple[str, str, int, str]]:
    """(process name, ip, port, kind) of each TCP listener and each bound UDP socket."""
    import psutil

    out = []
    for p in processes:
        try:
            name, conns = p.name(), p.net_connections(kind="inet")
        except psutil.Error:  # a worker that exited meanwhile
            continue
        for c in conns:
            if c.type == 1 and c.status == psutil.CONN_LISTEN:  # SOCK_STREAM
                out.append((name, c.laddr.ip, c.laddr.port, "tcp"))
            elif c.type == 2 and c.laddr and not c.raddr:  # SOCK_DGRAM, bound, unconnected
                out.append((name, c.laddr.ip, c.laddr.port, "udp"))
    return out


class SocketWatch:
    """Collects the sockets of our Ray's processes every POLL_S while the work runs (workers
    come and go: a Train worker's store lives only while its run does)."""

    POLL_S = 0.25

    def __init__(self, ray):
        import threading

        self.ray, self.seen, self.scans = ray, set(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            self.seen |= set(_bound_sockets(_ray_processes(self.ray)))
            self.scans += 1
            self._stop.wait(self.POLL_S)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)
        self.seen |= set(_bound_sockets(_ray_processes(self.ray)))


def test_private_local_ray_listens_on_loopback_only(ray_local, tmp_path):
    """Work of every kind a search starts (tasks, actors, the state API that Train's cleaner
    and Tune use, which goes through the dashboard and its agent, a Ray Train run with its
    torch process group, as regft.train builds it), and meanwhile every socket of every process
    of that Ray is on 127.0.0.0/8 or ::1. Before: GCS, raylet, agents, each worker and rank 0's
    TCPStore listened on all interfaces with token auth off: anyone on the network could run
    code there."""
    ray = ray_local
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    @ray.remote(num_cpus=0)
    def task():
        return os.getpid()

    @ray.remote(num_cpus=0)
    def alive_actors():  # inside a worker, as Train's cleaner calls it (pinned to this Ray)
        from ray.util.state import list_actors

        return len(list_actors(filters=[("state", "=", "ALIVE")]))

    @ray.remote(num_cpus=0)
    class Actor:
        def pid(self):
            return os.getpid()

    hold_s = 2 * SocketWatch.POLL_S + LISTEN_SETTLE_S

    def train_fn():  # (defined here: Ray ships it by value, the test module is not importable)
        """A Train worker with its process group up (rank 0 hosts torch.distributed's store)."""
        import torch
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1))
        time.sleep(hold_s)  # seen by the watch while it lives

    with SocketWatch(ray) as watch:
        actors = [Actor.remote() for _ in range(2)]
        pids = ray.get([task.remote() for _ in range(2)] + [a.pid.remote() for a in actors], timeout=120)
        assert ray.get(alive_actors.remote(), timeout=120) >= len(actors)
        time.sleep(LISTEN_SETTLE_S)
        assert set(pids) <= {p.pid for p in _ray_processes(ray)}, "workers not found as our Ray's"
        TorchTrainer(train_fn, torch_config=raylocal.LoopbackTorchConfig(backend="gloo"),
                     scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.5}),
                     run_config=RunConfig(name="loopback", storage_path=str(tmp_path))).fit()
        for a in actors:
            ray.kill(a)
    names = {n for n, *_ in watch.seen}
    assert {"gcs_server", "raylet"} <= names and watch.scans > 1, watch.seen  # the watch saw them
    assert any(n.startswith("ray::RayTrainWorker") for n in names), names  # and the Train run
    exposed = sorted(s for s in watch.seen if not _is_loopback(s[1]))
    assert not exposed, f"listening outside loopback: {exposed}"


def test_trainers_keep_their_store_on_loopback():
    """regft.train's trainers use the config whose process-group store binds loopback."""
    import inspect

    from regft import train

    assert "raylocal.LoopbackTorchConfig(" in inspect.getsource(train.build_trainer)


# ------------------------------------------------------------ a submitted job's outputs ----

@pytest.fixture
def job_dir(tmp_path, monkeypatch):
    """This process as the driver of a `ray job submit --working-dir` job: in a folder shaped
    like Ray's unpacked copy, with the job config Ray's job supervisor hands its driver."""
    pkg = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    pkg.mkdir(parents=True)
    monkeypatch.chdir(pkg)
    monkeypatch.setenv(raylocal.JOB_CONFIG_ENV, json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}, "metadata": {}}))
    monkeypatch.setenv(raylocal.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return pkg


def test_a_jobs_default_outputs_go_to_the_durable_home(job_dir, tmp_path, capsys):
    home = tmp_path / "home"
    storage, tracking, problems = raylocal.job_outputs("regft_runs", None)
    assert (storage, tracking, problems) == (str(home / "regft_runs"), f"sqlite:///{home / 'mlflow.db'}", [])
    assert str(home) in capsys.readouterr().out  # said where they went
    assert raylocal.outputs_dir() == home
    # given ones outside the copy stay as given
    assert raylocal.job_outputs("s3://b/runs", "http://head:5000") == ("s3://b/runs", "http://head:5000", [])


@pytest.mark.parametrize("where", ["plain", "job-in-own-folder"])
def test_outside_a_job_outputs_stay_where_they_were(where, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(raylocal.JOB_CONFIG_ENV, raising=False)
    if where == "job-in-own-folder":  # `ray job submit` without --working-dir
        monkeypatch.setenv(raylocal.JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    assert raylocal.job_working_dir() is None
    assert raylocal.job_outputs("regft_runs", None) == ("regft_runs", None, [])
    assert raylocal.outputs_dir() == Path.cwd() / ".regft"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("inside", ["storage", "tracking", "both"])
def test_a_job_refuses_outputs_inside_its_temporary_working_dir(inside, job_dir, capsys):
    """exit 2 naming the flag, before anything is created (no Ray needed: the plan refuses)."""
    argv = ["shapes", "--preset", "smoke"]
    if inside in ("storage", "both"):
        argv += ["--storage", str(job_dir / "runs")]
    if inside in ("tracking", "both"):
        argv += ["--tracking-uri", f"sqlite:///{job_dir / 'mlflow.db'}"]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    named = {"storage": ["--storage"], "tracking": ["--tracking-uri"],
             "both": ["--storage", "--tracking-uri"]}[inside]
    for flag in named:
        assert f"{flag} " in err and "temporary" in err and raylocal.HOME_ENV in err, err
    assert all(len(line) < 500 for line in err.splitlines()), err
    assert sorted(p.name for p in job_dir.iterdir()) == [], "the refused run created files"
    assert not Path(os.environ[raylocal.HOME_ENV]).exists()
