"""End-to-end tests of the main job, `python -m regft.tune`, offline on local Ray."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_readable_console, closed_port

from regft.tune import main

ROOT = Path(__file__).resolve().parents[1]


def _db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"




def _runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment}"
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("regft.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


# ---------------------------------------------------------------- bad input, no work ----

@pytest.mark.timeout(120)
def test_bad_inputs_exit_2_before_any_work(tmp_path, capsys, ray_local):
    bad_space = tmp_path / "bad.yaml"
    bad_space.write_text("parameters:\n  lr: {distribution: loguniform, low: 0, high: 1}\n"
                         "alpha: {low: 0, high: 2}\n")
    cases = [
        (["carz"], "unknown task 'carz'"),
        (["cars", "--search-space", str(bad_space)], "a log-scale range needs low > 0"),
        (["cars", "--search-space", str(bad_space)], "alpha must lie in [0, 1]"),
        (["cars", "--preset", "smoke", "--workers-per-trial", "4"], "could never start"),
        (["cars", "--preset", "smoke", "--gpus-per-trial", "1"], "has no GPUs"),
        (["cars", "--preset", "smoke", "--tracking-uri", f"http://127.0.0.1:{closed_port()}"],
         "tracking server unreachable"),
        (["cars", "--preset", "smoke", "--epochs", "0", "--num-samples", "-1"], "--epochs: must be > 0"),
        (["cars", "--preset", "smoke", "--sampler", "grid"], "argument --sampler: invalid choice: 'grid'"),
        (["cars"], "weights for ViT-B-16/openai"),  # paper default offline: weights unavailable
    ]
    for argv, expected in cases:
        rc = main([*argv, "--storage", str(tmp_path / "store"), "--tracking-uri", _db(tmp_path)]
                  if "--tracking-uri" not in argv else [*argv, "--storage", str(tmp_path / "store")])
        err = capsys.readouterr().err
        assert rc == 2, (argv, err)
        assert expected in err, (argv, err)
        assert "Traceback" not in err
    # nothing expensive happened: no dataset, no search state
    assert not (tmp_path / "store" / "datasets").exists()
    assert not (tmp_path / "store" / "searches").exists()


# ------------------------------------------------------------------ the smoke search ----

@pytest.mark.timeout(900)
def test_smoke_search_over_a_generation_dimension_logs_parent_children_and_lineage(
        tmp_path, ray_local, capsys):
    """The README-style search with images per class in its space (issue 14): 2 trials, ASHA,
    each trial on the dataset of its sampled count; the 100-per-class dataset is generated once
    and the 50-per-class one is its first 50 images of each class (0 new images)."""
    import json

    from regft import store as st

    space = Path(__file__).parents[1] / "regft" / "search_spaces" / "shapes-data.yaml"
    t0 = time.monotonic()
    rc = main(["shapes", "--preset", "smoke", "--num-samples", "2", "--epochs", "2",
               "--search-space", str(space), "--name", "e2e",
               "--storage", str(tmp_path / "store"), "--tracking-uri", _db(tmp_path)])
    wall_s = time.monotonic() - t0
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0, out[-3000:]
    assert "zero-shot" in out and "synthetic_val" in out
    # issue 15 with several trials (the second may be stopped early by ASHA): one line per
    # epoch per trial, one end line per trial, nothing lost from search.log
    assert_readable_console(out + captured.err, tmp_path / "store" / "searches" / "e2e" / "search.log",
                            trials=2, wall_s=wall_s)

    client, parents, children = _runs(_db(tmp_path), "regft-shapes")
    assert len(parents) == 1
    parent = parents[0]
    assert len(children) == 2
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    for c in children:
        for p in ("lr", "vc_weight", "alpha_grid", "model", "generator", "dataset_id", "seed",
                  "images_per_class"):
            assert p in c.data.params, (p, c.data.params)
        hist = client.get_metric_history(c.info.run_id, "select_metric")
        assert len(hist) >= 1
        # lineage: the trial's run names the dataset it trained on, by its content id
        (dataset_input,) = client.get_run(c.info.run_id).inputs.dataset_inputs
        assert dataset_input.dataset.digest == c.data.params["dataset_id"]
    counts = {c.data.params["images_per_class"] for c in children}
    assert counts == {"50", "100"}, "seed 0 no longer samples both counts in 2 trials"
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished, "at least the first trial runs to the end"
    for c in finished:
        assert "alpha_curve.png" in [a.path for a in client.list_artifacts(c.info.run_id)]
        curve = client.get_metric_history(c.info.run_id, "alpha_curve/select")
        assert sorted(m.step for m in curve) == list(range(0, 101, 10))
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "search_space.yaml", "summary.txt", "samples.png",
            "parallel_coordinate.png", "datasets.json"} <= arts
    assert "best/lr" in parent.data.params and "best/alpha" in parent.data.params
    assert parent.info.status == "FINISHED"

    # each image generated once: 16 classes x 100, the 50-per-class set served from it
    assert parent.data.metrics["images_generated"] == 1600
    listed = json.loads(Path(client.download_artifacts(parent.info.run_id, "datasets.json",
                                                       str(tmp_path))).read_text())
    full, served = sorted(listed, key=lambda d: -d["images"])
    assert (full["images"], full["generated"], served["images"], served["generated"]) == (1600, 1600, 800, 0)
    assert served["derived_from"] == full["dataset_id"]
    folders = sorted((tmp_path / "store" / "datasets").glob("*/manifest.json"))
    sizes = sorted(st.load_manifest(str(f.parent))["layout"]["num_items"] for f in folders)
    assert sizes == [800, 1600], sizes


# ------------------------------------------------------------------------- resume ----

def _count_finished(uri: str) -> int:
    try:
        _, _, children = _runs(uri, "regft-cars-first4")
    except Exception:  # the store may not exist yet
        return 0
    return sum(c.info.status == "FINISHED" for c in children)


@pytest.mark.timeout(900)
def test_resume_after_driver_killed_ends_with_exactly_n_trials(tmp_path, no_local_ray):
    n = 2  # one finished before the kill, one after: the fewest that shows both
    args = [sys.executable, "-m", "regft.tune", "cars", "--preset", "smoke", "--num-samples", str(n),
            "--epochs", "1", "--scheduler", "fifo", "--name", "killed", "--storage", str(tmp_path / "store"),
            "--tracking-uri", _db(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    # Tune saves its experiment state only at the start: the kill then always lands in the
    # window that once made resumes fail (Optuna told of the finished trial, Tune's state still
    # showing it running, so the resumed search replays its results)
    proc = subprocess.Popen(args, cwd=tmp_path, env={**env, "TUNE_GLOBAL_CHECKPOINT_S": "3600"},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and _count_finished(_db(tmp_path)) < 1 and proc.poll() is None:
        time.sleep(2)
    assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, at once
    proc.wait()
    done_before = _count_finished(_db(tmp_path))
    assert 1 <= done_before < n

    with open(tmp_path / "resume.log", "w") as rlog:  # whole output kept for a failure
        out = subprocess.run([*args, "--resume"], cwd=tmp_path, env=env, stdout=rlog,
                             stderr=subprocess.STDOUT, timeout=600)
    text = (tmp_path / "resume.log").read_text()
    assert out.returncode == 0, "\n".join(line for line in text.splitlines()
                                          if "Error" in line or "error:" in line)[-4000:] + text[-3000:]
    client, parents, children = _runs(_db(tmp_path), "regft-cars-first4")
    assert len(parents) == 1
    # a trial started in the second before the kill is not in Tune's saved state: the resumed
    # search replaces it, and its run is closed as orphaned (never left RUNNING, never counted)
    finished = [c for c in children if c.info.status == "FINISHED"]
    orphans = [c for c in children if c.info.status != "FINISHED"]
    assert len(finished) == n, [(c.data.tags.get("regft.trial_id"), c.info.status) for c in children]
    assert len({c.data.tags["regft.trial_id"] for c in finished}) == n
    assert all(c.info.status == "KILLED" and c.data.tags.get("regft.outcome") == "orphaned"
               for c in orphans), [(c.info.status, c.data.tags.get("regft.outcome")) for c in orphans]
    import pandas as pd

    arts = client.download_artifacts(parents[0].info.run_id, "results.csv", str(tmp_path))
    df = pd.read_csv(arts)
    assert len(df) == n and df["final"].all()
