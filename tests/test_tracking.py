import json
from types import SimpleNamespace

import pytest
from conftest import closed_port

from regft.cli import redact
from regft.mlflow_store import (
    PARENT_TAG,
    TRIAL_TAG,
    check_tracking_uri,
    default_tracking_uri,
    flat_params,
    get_or_create_experiment,
)
from regft.search_space import generation_key
from regft.tracking import DatasetLineage, MLflowTrialCallback, final_curves


def test_redact_hides_credentials():
    cfg = {"aws_secret_access_key": "abc", "token": "t", "lr": 0.1,
           "uri": "https://user:hunter2@example.org/x", "note": "key AKIAABCDEFGHIJKLMNOP here",
           "nested": {"api_key": "zzz", "ok": "fine"}}
    out = redact(cfg)
    assert out["aws_secret_access_key"] == "***" and out["token"] == "***"
    assert out["lr"] == 0.1 and out["nested"] == {"api_key": "***", "ok": "fine"}
    assert "hunter2" not in out["uri"] and "AKIA" not in out["note"]
    assert flat_params({"a": 1.5})["a"] == "1.5"




def test_check_tracking_uri(tmp_path):
    assert check_tracking_uri(default_tracking_uri(tmp_path)) == []
    problems = check_tracking_uri(f"http://127.0.0.1:{closed_port()}", timeout=2)
    assert problems and "unreachable" in problems[0]
    assert "absolute" in check_tracking_uri("sqlite:///relative.db")[0]
    assert "not writable" in check_tracking_uri(f"sqlite:///{tmp_path}/missing/dir/m.db")[0]
    assert "plain-folder" in check_tracking_uri(str(tmp_path / "mlruns"))[0]


def test_trial_callback_one_run_per_trial_even_after_restart(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "regft-test", str(tmp_path / "artifacts"))
    parent = client.create_run(exp, run_name="search").info.run_id

    trial = SimpleNamespace(trial_id="abc_00001", config={"lr": 1e-3, "vc_weight": 0.1,
                                                          "images_per_class": 8}, last_result={})
    # the search's datasets by generation key: the trial's run logs the one it trains on
    datasets = {generation_key({"images_per_class": n}): DatasetLineage(
        dataset_id=f"shapes-{n:016x}", path=str(tmp_path / f"shapes-{n:016x}"), images=3 * n,
        generated=0, splits={"train": 3 * n - 2, "val": 2}, settings={"images_per_class": n})
        for n in (4, 8)}
    cb = MLflowTrialCallback(uri, exp, parent, {"model": "tiny", "api_token": "s3cr3t"}, "s1",
                             datasets)
    cb.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        cb.on_trial_result(0, [], trial, {"epoch": epoch, "select_metric": 0.1 * epoch, "final": False})
    final = {"epoch": 2, "final": True, "select_metric": 0.5, "best_alpha": 0.4,
             "alpha_curve": [[0.0, 0.3], [0.4, 0.5], [1.0, 0.2]],
             "alpha_curve_real_test": [[0.0, 0.31], [0.4, 0.41], [1.0, 0.21]]}
    cb.on_trial_result(0, [], trial, final)
    trial.last_result = final
    cb.on_trial_complete(0, [], trial)

    # a new callback (driver restarted, search resumed) finds the same run
    cb2 = MLflowTrialCallback(uri, exp, parent, {}, "s1")
    assert cb2.run_id_for(trial) == cb.run_id_for(trial)

    runs = client.search_runs([exp], filter_string=f"tags.`{TRIAL_TAG}` = 'abc_00001'")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[PARENT_TAG] == parent
    assert run.data.params["lr"] == "0.001" and run.data.params["api_token"] == "***"
    hist = client.get_metric_history(run.info.run_id, "select_metric")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.1), (2, 0.2), (2, 0.5)]
    curve = client.get_metric_history(run.info.run_id, "alpha_curve/real_test")
    assert sorted((m.step, m.value) for m in curve) == [(0, 0.31), (40, 0.41), (100, 0.21)]
    arts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "alpha_curve.png" in arts
    # lineage (issue 14): one dataset input, logged once across the restart; digest = dataset id
    (inp,) = run.inputs.dataset_inputs
    assert inp.dataset.digest == "shapes-0000000000000008" == run.data.params["dataset_id"]
    assert inp.dataset.name == "shapes-0000000000000008"
    assert json.loads(inp.dataset.source)["uri"] == str(tmp_path / "shapes-0000000000000008")
    assert json.loads(inp.dataset.profile) == {"images": 24, "train_images": 22, "val_images": 2}
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"


def test_final_curves():
    assert final_curves({"alpha_curve": [[0, 1]], "alpha_curve_real_val": [[0.5, 0.2]], "x": 1}) == {
        "select": [(0.0, 1.0)], "real_val": [(0.5, 0.2)]}


@pytest.mark.parametrize("stopped", [True, False])
def test_status_reflects_early_stop(tmp_path, stopped):
    from mlflow.tracking import MlflowClient

    uri = default_tracking_uri(tmp_path)
    client = MlflowClient(uri)
    exp = get_or_create_experiment(client, "e", str(tmp_path / "a"))
    parent = client.create_run(exp).info.run_id
    trial = SimpleNamespace(trial_id="t1", config={}, last_result={"final": not stopped})
    cb = MLflowTrialCallback(uri, exp, parent, {}, "s")
    cb.on_trial_complete(0, [], trial)
    run = client.get_run(cb.run_id_for(trial))
    assert run.info.status == ("KILLED" if stopped else "FINISHED")
    assert run.data.tags["regft.outcome"] == ("stopped early" if stopped else "finished")


def test_orphaned_trials_are_closed_not_left_running(tmp_path):
    """After a resumed search returns, a child run (and Optuna trial) of a trial the search does
    not know is still RUNNING: it is ended KILLED / FAIL; known and finished ones are untouched."""
    import optuna
    from mlflow.tracking import MlflowClient

    from regft.mlflow_store import PARENT_TAG, TRIAL_TAG, close_orphan_runs
    from regft.searcher import fail_running_trials

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e", artifact_location=str(tmp_path / "a"))
    parent = client.create_run(exp).info.run_id
    runs = {t: client.create_run(exp, tags={PARENT_TAG: parent, TRIAL_TAG: t}).info.run_id
            for t in ("known", "done", "lost")}
    client.set_terminated(runs["done"], status="FINISHED")
    assert close_orphan_runs(client, exp, parent, ["known", "done"]) == ["lost"]
    lost = client.get_run(runs["lost"])
    assert lost.info.status == "KILLED" and lost.data.tags["regft.outcome"] == "orphaned"
    assert client.get_run(runs["known"]).info.status == "RUNNING"
    assert client.get_run(runs["done"]).info.status == "FINISHED"

    url = f"sqlite:///{tmp_path / 'o.db'}"
    study = optuna.create_study(study_name="s", storage=url)
    study.tell(study.ask(), 1.0)
    study.ask()
    assert fail_running_trials(url, "s") == [1]
    assert [t.state for t in optuna.load_study(study_name="s", storage=url).trials] == [
        optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]
