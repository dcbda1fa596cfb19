"""Issue 19 items 7 and 14: the Ray side of reliability.

- The private local Ray that regft starts (regft.raylocal, token auth off) is not reachable from
  the network: while it works, none of its processes listens outside the loopback interface.
"""
from __future__ import annotations

import ipaddress
import os
import time

import pytest

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


def test_private_local_ray_listens_on_loopback_only(ray_local):
    """Work of every kind a search starts (tasks, actors, the state API that Train's cleaner
    and Tune use, which goes through the dashboard and its agent), then every socket of every
    process of that Ray is on 127.0.0.0/8 or ::1. Today GCS, raylet, agents and each worker
    listen on all interfaces with token auth off: anyone on the network could run code."""
    ray = ray_local

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

    actors = [Actor.remote() for _ in range(2)]
    pids = ray.get([task.remote() for _ in range(2)] + [a.pid.remote() for a in actors], timeout=120)
    assert ray.get(alive_actors.remote(), timeout=120) >= len(actors)
    time.sleep(LISTEN_SETTLE_S)
    procs = _ray_processes(ray)
    assert set(pids) <= {p.pid for p in procs}, "the workers were not found as our Ray's processes"
    sockets = _bound_sockets(procs)
    names = {n for n, *_ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets  # the scan saw the core servers at all
    exposed = [s for s in sockets if not _is_loopback(s[1])]
    assert not exposed, f"listening outside loopback: {exposed}"
    for a in actors:
        ray.kill(a)
