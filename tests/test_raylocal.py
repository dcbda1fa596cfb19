"""A local Ray we start must keep working while another Ray instance runs on the machine.

Ray's state API, used inside workers by Ray Train's placement-group cleaner, finds its cluster
by scanning the machine's processes unless RAY_ADDRESS is set; with two instances it raises
"Found multiple active Ray instances" and the cleaner leaks the trial's reservation.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def other_ray():
    """A second, unrelated local Ray instance on this machine, as another user would have."""
    code = ("import ray, time; ray.init(address='local', num_cpus=1, include_dashboard=False); "
            "print('up', flush=True); time.sleep(600)")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout.readline().strip() == "up"
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_workers_find_their_own_cluster_next_to_another_ray(ray_local, other_ray):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def lookup():
        from ray.util.state import list_actors  # the lookup Train's cleaner makes

        list_actors()
        return os.environ.get("RAY_ADDRESS")

    deadline = time.time() + 60
    got = ray.get(lookup.remote(), timeout=max(1, deadline - time.time()))
    assert got == ray.get_runtime_context().gcs_address
