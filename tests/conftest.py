"""Shared test fixtures.

- HF_HUB_OFFLINE=1: tests never touch a model hub.
- One local Ray per test session (`ray_local` fixture), started with address="local" so it never
  attaches to another cluster on the machine, auth disabled (see docs/platform notes), and shut
  down at the end of the session.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A 2-CPU local Ray shared by every Ray-using test in the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=2,
            # Tune frees a stopped trial's resources through the state API (dashboard); without
            # it, ASHA-stopped trials leak their CPUs. It listens on 127.0.0.1 only.
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def regft_cache(tmp_path_factory, monkeypatch):
    """A per-session cache dir for materialised tiny models."""
    root = tmp_path_factory.getbasetemp() / "regft-cache"
    root.mkdir(exist_ok=True)
    monkeypatch.setenv("REGFT_CACHE", str(root))
    return root
