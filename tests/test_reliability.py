"""Reliability and safety (issue 7; the table in docs/RELIABILITY.md names each test).

- Bad input: `python -m regft.tune` (in process) exits 2 with one line per problem naming the
  flag or file, no traceback, before any dataset, search state or MLflow run exists.
- A trial whose loss diverges (NaN) stops itself, is marked in MLflow and Optuna, and the search
  goes on -- run on hostile class names (shell metacharacters, path separators, format braces)
  that must stay data end to end.
- Safe defaults: local services on 127.0.0.1, checkpoints never unpickle code, credentials
  redacted from errors, summaries and params.

Other fault tests live next to the code they exercise: test_generate (actor killed, exception,
disk full), test_train (worker exception / death -> resume from checkpoint), test_tune (driver
killed -> --resume).
"""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import closed_port
from PIL import Image

from regft.tune import main

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-s3cr3t"




def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


SPACE_OK = ("parameters:\n  lr: {distribution: loguniform, low: 1.0e-4, high: 1.0e-3}\n"
            "alpha: {low: 0.0, high: 1.0, step: 0.5}\n")


@pytest.fixture
def files(tmp_path):
    """Bad inputs of every kind, as files."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    real = tmp_path / "real"  # an ImageFolder whose classes are not the task's
    for name in ("purple", "AM General Hummer SUV 2000"):
        (real / name).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(real / name / "0.png")
    return {
        "empty": _write(tmp_path / "empty.txt", ""),
        "blank": _write(tmp_path / "blank.txt", "robin\n\nsparrow\n"),
        "dup": _write(tmp_path / "dup.txt", "robin\nsparrow\nRobin\n"),
        "good": _write(tmp_path / "good.txt", "robin\nsparrow\n"),
        "yaml": _write(tmp_path / "malformed.yaml", "parameters:\n  lr: {distribution: loguniform, low: 1\n"),
        "unknown": _write(tmp_path / "unknown.yaml", SPACE_OK + "colour: red\n"),
        "order": _write(tmp_path / "order.yaml",
                        "parameters:\n  lr: {distribution: uniform, low: 0.1, high: 0.01}\n"),
        "log0": _write(tmp_path / "log0.yaml",
                       "parameters:\n  lr: {distribution: loguniform, low: 0, high: 0.1}\n"),
        "alpha": _write(tmp_path / "alpha.yaml", SPACE_OK.replace("high: 1.0, step", "high: 1.5, step")),
        "vc": _write(tmp_path / "vc.yaml",
                     "parameters:\n  vc_weight: {distribution: uniform, low: -0.5, high: 1.0}\n"),
        "blocked_storage": str(blocker / "store"),
        "real_bad": str(real),
        "missing": str(tmp_path / "no-such-folder"),
    }


SMOKE = ["cars", "--preset", "smoke"]
# (id, argv, text the error must contain: it names the flag or file and the problem)
BAD_INPUTS = [
    ("unknown-task", ["carz", "--preset", "smoke"], "unknown task 'carz'"),
    ("classnames-empty", ["birds", "--preset", "smoke", "--classnames", "{empty}"], "no class names"),
    ("classnames-blank", ["birds", "--preset", "smoke", "--classnames", "{blank}"],
     "blank class name on line(s) [2]"),
    ("classnames-duplicate", ["birds", "--preset", "smoke", "--classnames", "{dup}"],
     "duplicate class name(s) 'Robin' (lines 1 and 3)"),
    ("space-malformed-yaml", [*SMOKE, "--search-space", "{yaml}"], "malformed YAML"),
    ("space-unknown-key", [*SMOKE, "--search-space", "{unknown}"], "unknown top-level key 'colour'"),
    ("space-low-ge-high", [*SMOKE, "--search-space", "{order}"], "low (0.1) must be < high (0.01)"),
    ("space-log-low-le-0", [*SMOKE, "--search-space", "{log0}"], "a log-scale range needs low > 0"),
    ("space-alpha-outside-0-1", [*SMOKE, "--search-space", "{alpha}"], "alpha must lie in [0, 1]"),
    ("space-negative-vc-weight", [*SMOKE, "--search-space", "{vc}"], "vc_weight must be >= 0"),
    ("epochs-0", [*SMOKE, "--epochs", "0"], "--epochs: must be > 0, got 0"),
    ("batch-size-negative", [*SMOKE, "--batch-size", "-8"], "--batch-size: must be > 0, got -8"),
    ("images-per-class-0", [*SMOKE, "--images-per-class", "0"], "--images-per-class: must be > 0"),
    ("resolution-not-multiple-of-8", [*SMOKE, "--resolution", "30"],
     "--resolution: must be a positive multiple of 8"),
    ("gpus-on-cpu-cluster", [*SMOKE, "--gpus-per-trial", "1"], "the Ray cluster has no GPUs"),
    ("workers-never-fit", [*SMOKE, "--workers-per-trial", "4"], "the trial could never start"),
    ("tracking-unreachable", [*SMOKE, "--tracking-uri", "http://127.0.0.1:{port}"],
     "tracking server unreachable"),
    ("tracking-credentials-redacted", [*SMOKE, "--tracking-uri", f"http://me:{SECRET}@127.0.0.1:{{port}}"],
     "http://me:***@127.0.0.1"),
    ("storage-not-writable", [*SMOKE, "--storage", "{blocked_storage}"], "not writable"),
    ("real-test-missing", [*SMOKE, "--real-test", "{missing}"], "no such file or folder"),
    ("real-val-wrong-labels", [*SMOKE, "--real-val", "{real_bad}"], "'purple'"),
    ("model-weights-offline", [*SMOKE, "--model", "ViT-B-16", "--pretrained", "openai"],
     "weights for ViT-B-16/openai"),
    ("generator-weights-offline", [*SMOKE, "--generator", "stabilityai/stable-diffusion-2-1-base"],
     "stable-diffusion-2-1-base"),
    ("unsafe-search-name", [*SMOKE, "--name", "../../etc"], "--name '../../etc': names folders"),
    ("unsafe-task-name", ["../x", "--preset", "smoke", "--classnames", "{good}"],
     "task name '../x': names folders"),
]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("argv,expected", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_exits_2_naming_the_problem_before_any_work(argv, expected, files, tmp_path,
                                                             capsys, ray_local):
    argv = [a.format(port=closed_port(), **files) for a in argv]
    defaults = {"--storage": str(tmp_path / "store"),
                "--tracking-uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    argv += [x for flag, v in defaults.items() if flag not in argv for x in (flag, v)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert expected in err, err
    assert err.startswith("error: ") and "Traceback" not in err and SECRET not in err
    # nothing was started: no dataset, no search state, no MLflow store
    assert not (tmp_path / "store" / "datasets").exists()
    assert not (tmp_path / "store" / "searches").exists()
    assert not (tmp_path / "mlflow.db").exists()


def test_every_problem_is_reported_in_one_pass(files, tmp_path, capsys):
    """Flags, task file, search space, storage, tracking, weights and real data at once (all
    checked before Ray starts, so no Ray here)."""
    rc = main(["birds", "--classnames", files["dup"], "--epochs", "0", "--resolution", "30",
               "--search-space", files["log0"], "--storage", files["blocked_storage"],
               "--tracking-uri", f"http://127.0.0.1:{closed_port()}", "--real-test", files["missing"],
               "--name", "a/b"])
    err = capsys.readouterr().err
    assert rc == 2
    n = int(re.match(r"error: (\d+) problems:", err).group(1))
    for needle in ("--epochs", "--resolution", "--name 'a/b'", "duplicate class name",
                   "a log-scale range", "--storage", "unreachable", "--real-test",
                   "weights for ViT-B-16/openai"):
        assert needle in err, needle
    assert n >= 9


# --------------------------------------------------------------- divergence ----

def test_diverged_trial_is_pruned_in_optuna_and_marked_in_mlflow(tmp_path):
    """Unit level (no Ray): the searcher and the MLflow callback on a diverged last result."""
    import optuna
    from mlflow.tracking import MlflowClient
    from ray import tune

    from regft.mlflow_store import default_tracking_uri, get_or_create_experiment
    from regft.searcher import make_searcher
    from regft.tracking import MLflowTrialCallback

    searcher = make_searcher(None, None, seed=0)
    searcher.set_search_properties("select_metric", "max", {"lr": tune.loguniform(1e-5, 1e-2)})
    searcher.suggest("bad")
    diverged = {"epoch": 1, "train_loss": float("nan"), "select_metric": 0.0, "diverged": True,
                "final": False, "training_iteration": 1}
    searcher.on_trial_complete("bad", diverged)
    (t,) = searcher._ot_study.trials
    assert t.state == optuna.trial.TrialState.PRUNED and t.user_attrs == {"diverged": True}

    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "e", str(tmp_path / "a"))
    parent = client.create_run(exp).info.run_id
    trial = SimpleNamespace(trial_id="t1", config={"lr": 1e3}, last_result=diverged)
    cb = MLflowTrialCallback(uri, exp, parent, {}, "s")
    cb.on_trial_result(0, [], trial, diverged)
    cb.on_trial_complete(0, [], trial)
    run = client.get_run(cb.run_id_for(trial))
    assert run.info.status == "FAILED"
    assert run.data.tags["regft.outcome"] == "diverged" and run.data.tags["regft.diverged"] == "true"
    assert "train_loss" not in run.data.metrics  # NaN is never logged as a number


HOSTILE = ["$(touch {canary})", "red; rm -rf {victim} && echo pwned", "../../escape/passwd",
           "{{0.__class__}} \"crème\" 'brûlée' back\\slash|pipe"]


@pytest.mark.timeout(600)
def test_nan_trial_stops_itself_and_the_search_goes_on(tmp_path, ray_local, capsys):
    """Two trials, lr 1e3 (diverges to NaN in epoch 1) then 1e-3 (seed 0 draws them in that
    order): the first stops itself and is marked, the second finishes, the search succeeds.
    The task's class names are hostile strings, which must stay data all the way."""
    import optuna
    import pandas as pd
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from regft import store as st

    canary, victim = tmp_path / "canary", tmp_path / "victim"
    victim.write_text("still here")
    names = [n.format(canary=canary, victim=victim) for n in HOSTILE]
    classnames = _write(tmp_path / "hostile names.txt", "\n".join(names) + "\n")
    space = _write(tmp_path / "space.yaml",
                   "parameters:\n  lr: {distribution: choice, values: [1.0e+3, 1.0e-3]}\n"
                   "alpha: {low: 0.0, high: 1.0, step: 0.5}\n")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["hostile", "--classnames", classnames, "--preset", "smoke", "--num-samples", "2",
               "--epochs", "1", "--scheduler", "fifo", "--search-space", space, "--name", "div",
               "--seed", "0", "--storage", str(tmp_path / "store"), "--tracking-uri", uri])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "1 trial(s) diverged" in out
    assert "plumbing check" in out  # smoke on a non-shapes task says its numbers are noise

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("regft-hostile")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("regft.role") == "search"]
    children = {r.data.params["lr"]: r for r in runs if "mlflow.parentRunId" in r.data.tags}
    assert set(children) == {"1000.0", "0.001"}, "seed 0 no longer draws both lr values"
    bad, good = children["1000.0"], children["0.001"]
    assert bad.info.status == "FAILED" and bad.data.tags["regft.outcome"] == "diverged"
    assert good.info.status == "FINISHED" and good.data.tags["regft.outcome"] == "finished"
    assert parent.info.status == "FINISHED" and parent.data.metrics["trials_diverged"] == 1.0
    assert parent.data.params["best/lr"] == "0.001"
    csv = pd.read_csv(client.download_artifacts(parent.info.run_id, "results.csv", str(tmp_path)))
    assert csv.set_index("config/lr")["diverged"].to_dict() == {1000.0: True, 0.001: False}

    study = optuna.load_study(study_name="div", storage=f"sqlite:///{tmp_path}/store/optuna/div.db")
    states = {t.params["lr"]: (t.state, t.user_attrs) for t in study.trials}
    assert states == {1000.0: (optuna.trial.TrialState.PRUNED, {"diverged": True}),
                      0.001: (optuna.trial.TrialState.COMPLETE, {})}

    # class names were data: no shell ran, nothing escaped, prompts are the names verbatim
    assert not canary.exists() and victim.read_text() == "still here"
    (dataset,) = (tmp_path / "store" / "datasets").iterdir()
    allowed = re.compile(r"^(manifest\.json|samples\.png|shards|shards/shard-\d{5}\.parquet)$")
    for p in dataset.rglob("*"):
        assert allowed.match(p.relative_to(dataset).as_posix()), p
    assert not any(tmp_path.rglob("escape")) and not any(tmp_path.rglob("passwd"))
    table = pq.read_table(str(dataset / "shards"), columns=["classname", "prompt"])
    assert set(table.column("classname").to_pylist()) == set(names)
    assert {f"a photo of a {n}." for n in names} == set(table.column("prompt").to_pylist())
    assert st.load_manifest(str(dataset))["task"]["classnames"] == names


# ------------------------------------------------------------- safe defaults ----

def test_local_ray_dashboard_listens_on_localhost_only(ray_local):
    from ray._private.worker import get_dashboard_url

    assert get_dashboard_url().split(":")[0] == "127.0.0.1"


def test_mlflow_servers_we_start_or_document_bind_to_localhost(tmp_path):
    """scripts/mlflow_server.sh (run against a stand-in `mlflow` that prints its arguments) and
    every `mlflow ui|server` command in the docs, the README and what regft prints."""
    import os
    import subprocess

    from regft.search import summary_table

    script = ROOT / "scripts" / "mlflow_server.sh"
    if script.is_file():
        fake = tmp_path / "bin" / "mlflow"
        fake.parent.mkdir()
        fake.write_text('#!/bin/sh\necho "$@"\n')
        fake.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env.update(PATH=f"{fake.parent}:{env['PATH']}", MLFLOW_HOME=str(tmp_path / "home"))
        out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        assert "--host 127.0.0.1" in out.stdout, out.stdout

    texts = {p: p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"),
                                        *ROOT.glob("regft/*.py")] if p.is_file()}
    best = {"trial_id": "t", "best_alpha": 0.5, "config/lr": 1e-3}
    texts["summary"] = summary_table(best, "s", "sqlite:////tmp/m.db", "rid")
    commands = [(p, line) for p, t in texts.items() for line in t.splitlines()
                if re.search(r"\bmlflow (ui|server) --", line)]
    assert any(p == "summary" for p, _ in commands)
    for p, line in commands:
        assert "--host 127.0.0.1" in line, (p, line)


class _Exploit:
    def __init__(self, canary):
        self.canary = str(canary)

    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.canary),))


def test_checkpoints_never_unpickle_code(tmp_path):
    import pickle

    import torch

    from regft.checkpoint import load as load_checkpoint

    canary = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(2), "evil": _Exploit(canary)}, tmp_path / "model.pt")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(str(tmp_path))
    assert not canary.exists()


def test_credentials_never_reach_summaries_or_params():
    from regft.mlflow_store import flat_params
    from regft.search import summary_table

    uri = f"https://bob:{SECRET}@mlflow.example.org"
    best = {"trial_id": "t", "best_alpha": 0.5, "config/lr": 1e-3}
    assert SECRET not in summary_table(best, "s", uri, "rid")
    params = flat_params({"tracking_uri": uri, "storage": f"s3://AKIAABCDEFGHIJKLMNOP:{SECRET}@b/x",
                          "gen_options": {"hf_token": "hf_abcdefghijklmnopqrstu"}})
    assert SECRET not in str(params) and "AKIA" not in str(params) and "hf_abc" not in str(params)


def test_class_names_stay_data_in_prompts_and_names():
    from regft.generate import dataset_id
    from regft.prompts import make_items
    from regft.tasks import TaskError, load_task, safe_slug

    names = [n.format(canary="/tmp/c", victim="/tmp/v") for n in HOSTILE]
    items = make_items("t", names, "a photo of a {}, a type of car.", 1)
    assert [it.prompt for it in items] == [f"a photo of a {n}, a type of car." for n in names]
    did = dataset_id({"task": "../../x; rm -rf ~", "a": 1})
    assert re.fullmatch(r"[A-Za-z0-9_-]+", did)
    assert re.fullmatch(r"[A-Za-z0-9._-]+", safe_slug("hostile names; $(rm -rf ~)/.."))
    with pytest.raises(TaskError, match="unknown task"):
        load_task("../tasks/cars")  # a catalog name is never a path
