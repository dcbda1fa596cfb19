"""Early-stopped trials reach Optuna as PRUNED, finished ones as COMPLETE (and stock Ray would not)."""
import optuna
import pytest
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from regft.reports import DivergedReport
from regft.searcher import DIVERGED_ATTR, make_searcher

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


def test_random_sampler_is_seeded_and_keeps_the_pruning(tmp_path):
    """--sampler random (the search-value baseline): Optuna's RandomSampler, seeded like TPE, with
    the same PRUNED/COMPLETE bookkeeping; an unknown sampler is refused by name."""
    def first(sampler, seed):
        s = make_searcher(None, None, seed=seed, sampler=sampler)
        s.set_search_properties("select_metric", "max", SPACE)
        return s, [s.suggest(str(i)) for i in range(3)]

    searcher, proposals = first("random", 7)
    assert isinstance(searcher._sampler, optuna.samplers.RandomSampler)
    assert proposals == first("random", 7)[1] and proposals != first("random", 8)[1]
    assert _drive(make_searcher(None, None, seed=0, sampler="random")) == {
        0: optuna.trial.TrialState.PRUNED, 1: optuna.trial.TrialState.COMPLETE,
        2: optuna.trial.TrialState.FAIL}
    with pytest.raises(ValueError, match="'grid' is not one of tpe, random"):
        make_searcher(None, None, seed=0, sampler="grid")


FINAL = {"select_metric": 0.5, "training_iteration": 2, "final": True}
# the last report of a trial whose loss went NaN at epoch 2 (regft.train.diverged_report's wire)
DIVERGED = {"training_iteration": 2, **DivergedReport.WIRE}
S = optuna.trial.TrialState


def _resume_replay(make, tmp_path, final=FINAL, replay_result=True):
    """What a resumed search does: Tune saved the searcher while trial "a" ran, the trial then
    ended (`final`: finished, or diverged; Optuna told, in its own database) and the driver died
    before Tune saved again. The restored searcher sees "a" replay its end, then asks for more.
    `replay_result=False`: Tune sends the end alone, as it does when the scheduler (ASHA) decides
    to stop the trial on that result (the searcher then gets no on_trial_result for it)."""
    url = f"sqlite:///{tmp_path}/o.db"
    first = make(url)
    first.set_search_properties("select_metric", "max", SPACE)
    first.suggest("a")
    first.on_trial_result("a", {"select_metric": 0.3, "training_iteration": 1})
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's periodic save, trial still running
    first.on_trial_result("a", final)
    first.on_trial_complete("a", final)
    resumed = make(url)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    if replay_result:
        resumed.on_trial_result("a", final)  # the restarted trial repeats its last report
    resumed.on_trial_complete("a", final)
    resumed.on_trial_complete("a", None, error=True)  # and, restarted once more, crashes
    assert resumed.suggest("b") is not None
    return {t.number: (t.state, t.user_attrs) for t in optuna.load_study(study_name="s", storage=url).trials}


def _ours(url):
    return make_searcher(None, None, seed=0, storage_url=url, study_name="s")


@pytest.mark.parametrize("replay_result", [True, False], ids=["result-then-end", "end-only"])
@pytest.mark.parametrize("final, told", [(FINAL, (S.COMPLETE, {})),
                                         (DIVERGED, (S.PRUNED, {DIVERGED_ATTR: True}))],
                         ids=["finished", "diverged"])
def test_resumed_search_ignores_replayed_results_of_told_trials(tmp_path, final, told, replay_result):
    """A diverged trial is told as PRUNED with a user attribute: setting that attribute on the
    finished Optuna trial must not kill the resumed search either (issue 19 item 15)."""
    states = _resume_replay(_ours, tmp_path, final, replay_result)
    assert states == {0: told, 1: (S.RUNNING, {})}


def test_stock_searcher_fails_on_the_replay(tmp_path):
    """The failure we guard against (it killed `--resume` runs): stock OptunaSearch raises."""
    def stock(url):
        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=0), study_name="s",
                            storage=optuna.storages.RDBStorage(url))
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        _resume_replay(stock, tmp_path)
