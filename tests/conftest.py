"""Shared test fixtures.

- HF_HUB_OFFLINE=1: tests never touch a model hub.
- One local Ray per test session (`ray_local` fixture), started with address="local" so it never
  attaches to another cluster on the machine, and shut down at the end of the session. Token
  auth is off: regft.raylocal binds every server to 127.0.0.1 (test_reliability tests that), so
  only local users could reach it, for the minutes a test session lasts, and token auth would
  need a token file written on the machine (docs/RELIABILITY.md, "Who can reach Ray").
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import socket  # noqa: E402

import pytest  # noqa: E402


def closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, read, released): an unreachable server."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _start_local_ray():
    import ray

    if not ray.is_initialized():
        from regft import raylocal

        # dashboard on 127.0.0.1 (Tune frees stopped trials' CPUs through it); workers pinned
        # to this cluster, so another Ray on the machine cannot confuse Train's cleaner
        raylocal.init("local", num_cpus=2, quiet=True)
    return ray


@pytest.fixture(autouse=True)
def _log_handlers_on_open_streams():
    """A logger configured during an earlier test (Ray Data's, first used under capsys) keeps
    that test's capture stream, closed since; point such handlers at the current stderr, as in a
    fresh process, so one test's output does not depend on which test ran first."""
    import logging
    import sys

    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and getattr(handler.stream, "closed", False):
                handler.stream = sys.stderr  # not setStream: it flushes the closed one
    yield


@pytest.fixture(scope="session")
def _ray_session():
    """Shuts the shared local Ray down at the end of the session."""
    yield
    import ray

    ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A 2-CPU local Ray shared by every Ray-using test (started once, restarted only if a
    test had to shut it down)."""
    return _start_local_ray()


@pytest.fixture(scope="module")
def ray_local_module(_ray_session):
    """The same shared Ray, for module-scoped fixtures (a function-scoped fixture cannot be
    requested from those)."""
    return _start_local_ray()


@pytest.fixture
def no_local_ray():
    """For tests that start Ray clusters in subprocesses: stop the shared one first. With two
    Ray instances on one machine, Ray Train's placement-group cleaner cannot tell which
    cluster it belongs to and fails, leaking the trial's reservation."""
    import ray

    ray.shutdown()
    yield


@pytest.fixture
def regft_cache(tmp_path_factory, monkeypatch):
    """A per-session cache dir for materialised tiny models."""
    root = tmp_path_factory.getbasetemp() / "regft-cache"
    root.mkdir(exist_ok=True)
    monkeypatch.setenv("REGFT_CACHE", str(root))
    return root


@pytest.fixture(scope="session")
def shapes_smoke(_ray_session, tmp_path_factory):
    """One `python -m regft.tune shapes --preset smoke --num-samples 1` run (the README's
    quickstart with one trial, ~3 min on 2 cores), shared by every test that reads its results
    (test_shapes_smoke: the method's numbers; test_deliver: export, registry, predict, evaluate).

    Returns rc, stdout, storage root, tracking URI, MLflow experiment, the audit log path and
    the argv (without --audit-log) that reruns it.
    """
    import contextlib
    import io
    import time

    from regft.tune import main

    _start_local_ray()
    root = tmp_path_factory.mktemp("shapes-smoke")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    out = io.StringIO()
    # both streams, as a person sees them: regft.console filters what reaches them (issue 15)
    argv = ["shapes", "--preset", "smoke", "--num-samples", "1", "--name", "smoke-e2e",
            "--storage", str(root / "runs"), "--tracking-uri", uri]
    t0 = time.monotonic()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = main([*argv, "--audit-log", str(root / "audit.jsonl")])
    return {"rc": rc, "out": out.getvalue(), "wall_s": time.monotonic() - t0,
            "storage": root / "runs", "tracking_uri": uri,
            "experiment": "regft-shapes", "audit": root / "audit.jsonl", "search": "smoke-e2e",
            "argv": argv}


# A learnable toy task for the plain-torch tests (test_engine, test_loop): class k is a noisy
# square of colour k on grey.
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230), (230, 220, 40))
COLOUR_CLASSES = ("red", "green", "blue", "yellow")


def colour_images(n: int, seed: int, size: int = 32):
    """uint8 (n, size, size, 3) images and int labels (n,) of the colour-square task."""
    import numpy as np

    colours = np.array(COLOURS, dtype=np.float32)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(colours), n)
    imgs = np.full((n, size, size, 3), 128, dtype=np.float32)
    for i, k in enumerate(labels):
        x, y = rng.integers(0, size // 2, 2)
        imgs[i, y:y + size // 2, x:x + size // 2] = colours[k]
    return np.clip(imgs + rng.normal(0, 12, imgs.shape), 0, 255).astype(np.uint8), labels


# README's quickstart prints at most about this many lines for 2 trials x 13 epochs (issue 15),
# not counting Tune's status tables: those come every STATUS_INTERVAL_S of wall time, so a
# loaded machine prints more of them, each at most MAX_TABLE_LINES long
MAX_CONSOLE_LINES = 150
MAX_TABLE_LINES = 20
# the lines of one Tune status table: its header lines, then a box drawn with these characters
_TABLE_HEAD = ("Trial status:", "Current time:", "Current best trial:", "Logical resource usage:")
_TABLE_BOX = ("╭", "│", "├", "╰", "+", "|")  # a terminal draws boxes, a pipe ASCII


def _tables(lines: list[str]) -> list[list[str]]:
    """Tune's status tables in `lines`, each as its lines."""
    tables: list[list[str]] = []
    for line in lines:
        if line.startswith("Trial status:"):
            tables.append([line])
        elif tables and line.startswith(_TABLE_HEAD + _TABLE_BOX) and tables[-1][-1][:1] != "╰":
            tables[-1].append(line)
    return tables


def assert_readable_console(out: str, log_file, trials: int, wall_s: float) -> None:
    """What a search printed (both streams, through regft.console) in `wall_s` seconds is short
    (a fixed budget, plus one status table per STATUS_INTERVAL_S), shows each epoch of each of
    its `trials` exactly once and one end line per trial, has no cursor-up sequence and no
    core_worker line; `log_file` (search.log) holds every line of it."""
    import re

    from regft.console import plain
    from regft.console_ray import STATUS_INTERVAL_S

    lines = out.splitlines()
    tables = _tables(lines)
    assert len(tables) <= 1 + wall_s / STATUS_INTERVAL_S, (len(tables), wall_s)
    assert all(len(table) <= MAX_TABLE_LINES for table in tables), max(map(len, tables))
    assert len(lines) - sum(map(len, tables)) <= MAX_CONSOLE_LINES, len(lines)
    assert "\x1b[A" not in out and "core_worker" not in out
    started = re.findall(r"^trial (\w+)  started:", out, re.M)
    assert len(started) == trials, started
    for trial in started:
        epochs = re.findall(rf"^trial {trial}  epoch +(\d+)/(\d+) ", out, re.M)
        assert [int(e) for e, _ in epochs] == list(range(1, len(epochs) + 1)), (trial, epochs)
        end = re.findall(rf"^trial {trial}  (finished|stopped early|diverged|failed)", out, re.M)
        assert len(end) == 1, (trial, end)
        if end == ["finished"]:
            assert len(epochs) == int(epochs[0][1])  # every epoch, once
    log = plain(log_file.read_bytes())
    missing = [line for line in lines if line.strip() and line not in log]
    assert not missing, missing[:5]

