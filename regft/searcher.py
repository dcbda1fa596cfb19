"""Optuna TPE (or random search, the baseline) for Ray Tune, with early-stopped trials
reported to Optuna as PRUNED.

Every trial reports per epoch (the fine-tuned model's selection metric) and, when it finishes,
a final result (`final: True`) whose `select_metric` is the best weight-space ensemble's. ASHA
may stop a trial after any epoch; stock `OptunaSearch` would then tell Optuna the trial is
COMPLETE with that low-budget, pre-ensemble value, and TPE would treat it as a real observation
of the configuration. Here such trials are PRUNED (their intermediate values stay recorded), so
TPE's "good"/"bad" split is made of finished trials only.

A trial whose loss diverged (NaN/inf: its last result has `diverged: True`, see
regft.train.diverged_report) ends early too: it is PRUNED as well (so TPE still counts its
region among the bad ones) and carries the Optuna user attribute `diverged=True`.

A resumed search (`--resume` after the driver was killed) replays results of trials that Optuna
had already been told about: the study lives in its own database, written when a trial ends,
while Tune's experiment state is saved every few seconds and may still show the trial running.
Optuna refuses to update a finished trial (`UpdateFinishedTrialError`), which stock `OptunaSearch`
lets escape from `on_trial_result` and so kills the whole search; here such replays are ignored,
whichever call comes first (a result, a finished or diverged end, an error end).
"""
from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch

from regft.reports import DivergedReport, FinalReport

DIVERGED_ATTR = "diverged"  # the Optuna user attribute of a diverged trial
SAMPLERS = ("tpe", "random")  # --sampler: regft's default, and random search as a baseline


def is_report(result: dict, kind) -> bool:
    """Whether a Tune result is a report of `kind` (FinalReport, DivergedReport): it carries that
    kind's fixed wire values (an epoch report carries neither kind's)."""
    return all(k in result and result[k] == v for k, v in kind.WIRE.items())


class FinishedOnlyOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict):
        try:
            return super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:  # replayed after a resume: told already
            self._completed_trials.add(trial_id)
            return None

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if error or not result or is_report(result, FinalReport):
            return super().on_trial_complete(trial_id, result, error)
        if trial_id in self._completed_trials:
            return None
        # stopped before its final (ensembled) result: pruned, not complete
        ot_trial = self._ot_trials[trial_id]
        # Both calls update the Optuna trial, so both raise on one told before the driver died
        # (the attribute is set before the tell, so such a trial carries it already). Tune
        # sends a resumed trial's end without its result when the scheduler stops it there, so
        # this can be the first call of the replay.
        try:
            if is_report(result, DivergedReport):
                ot_trial.set_user_attr(DIVERGED_ATTR, True)
            self._ot_study.tell(ot_trial, None, state=optuna.trial.TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        self._completed_trials.add(trial_id)
        return None


def make_searcher(metric: str | None, mode: str | None, seed: int, storage_url: str | None = None,
                  study_name: str | None = None, sampler: str = "tpe") -> FinishedOnlyOptunaSearch:
    """Seeded TPE, or seeded random search (`sampler`, one of SAMPLERS); the space comes from the
    Tuner's `param_space` (Tune converts it).

    `storage_url` (e.g. sqlite:///.../optuna.db) keeps the study on disk so the search's
    importance plots can be made from it and a resumed search continues it."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {', '.join(SAMPLERS)}")
    sampler = (optuna.samplers.TPESampler(seed=seed) if sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    storage = optuna.storages.RDBStorage(storage_url) if storage_url else None
    return FinishedOnlyOptunaSearch(
        metric=metric, mode=mode, sampler=sampler, storage=storage,
        study_name=study_name,
    )


def fail_running_trials(storage_url: str, study_name: str) -> list[int]:
    """After a search has returned nothing runs, so a study trial still RUNNING was orphaned (its
    driver died before Tune saved it; see regft.tracking.close_orphan_runs): mark it FAIL, so
    the study does not show it running for ever. Returns the trial numbers."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for t in running:
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return [t.number for t in running]
