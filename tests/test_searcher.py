"""Early-stopped trials reach Optuna as PRUNED, finished ones as COMPLETE (and stock Ray would not)."""
import optuna
import pytest
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from regft.searcher import make_searcher

SPACE = {"lr": tune.loguniform(1e-5, 1e-2), "vc_weight": tune.uniform(0, 1)}


def _drive(searcher):
    assert searcher.set_search_properties("select_metric", "max", SPACE)
    for tid in ("a", "b", "c"):
        assert searcher.suggest(tid) is not None
    searcher.on_trial_result("a", {"select_metric": 0.2, "training_iteration": 1})
    # a: stopped by ASHA after epoch 1 (no final result)
    searcher.on_trial_complete("a", {"select_metric": 0.2, "training_iteration": 1, "final": False})
    # b: finished with its ensembled value
    searcher.on_trial_complete("b", {"select_metric": 0.7, "training_iteration": 3, "final": True})
    # c: crashed
    searcher.on_trial_complete("c", None, error=True)
    return {t.number: t.state for t in searcher._ot_study.trials}


def test_early_stopped_trials_are_pruned():
    states = _drive(make_searcher(None, None, seed=0))
    S = optuna.trial.TrialState
    assert states == {0: S.PRUNED, 1: S.COMPLETE, 2: S.FAIL}


def test_stock_searcher_would_count_them_complete():
    """The behaviour we correct: stock OptunaSearch marks the stopped trial COMPLETE."""
    states = _drive(OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0)))
    assert states[0] == optuna.trial.TrialState.COMPLETE


def test_seeded_suggestions_repeat(tmp_path):
    runs = []
    for _ in range(2):
        s = make_searcher(None, None, seed=7)
        s.set_search_properties("select_metric", "max", SPACE)
        runs.append([s.suggest(str(i)) for i in range(3)])
    assert runs[0] == runs[1]
    stored = make_searcher(None, None, seed=7, storage_url=f"sqlite:///{tmp_path}/o.db", study_name="s")
    stored.set_search_properties("select_metric", "max", SPACE)
    stored.suggest("x")
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/o.db").trials) == 1


def _resume_replay(make, tmp_path):
    """What a resumed search does: Tune saved the searcher while trial "a" ran, the trial then
    finished (Optuna told, in its own database) and the driver died before Tune saved again.
    The restored searcher sees "a" replay its last result and completion, then asks for more."""
    url = f"sqlite:///{tmp_path}/o.db"
    first = make(url)
    first.set_search_properties("select_metric", "max", SPACE)
    first.suggest("a")
    first.on_trial_result("a", {"select_metric": 0.3, "training_iteration": 1})
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's periodic save, trial still running
    final = {"select_metric": 0.5, "training_iteration": 2, "final": True}
    first.on_trial_result("a", final)
    first.on_trial_complete("a", final)
    resumed = make(url)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    resumed.on_trial_result("a", final)  # the restarted trial repeats its final report
    resumed.on_trial_complete("a", final)
    assert resumed.suggest("b") is not None
    return {t.number: t.state for t in optuna.load_study(study_name="s", storage=url).trials}


def test_resumed_search_ignores_replayed_results_of_told_trials(tmp_path):
    states = _resume_replay(lambda url: make_searcher(None, None, seed=0, storage_url=url, study_name="s"),
                            tmp_path)
    assert states == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.RUNNING}


def test_stock_searcher_fails_on_the_replay(tmp_path):
    """The failure we guard against (it killed `--resume` runs): stock OptunaSearch raises."""
    def stock(url):
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                            storage=optuna.storages.RDBStorage(url))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        _resume_replay(stock, tmp_path)
