"""The driver's side of a trial's phase breakdown (regft.phases): a Tune callback that times what
the worker cannot see (the wait for resources, the actor starting, the final report's delivery,
the teardown) and logs every phase of a finished or stopped trial to its MLflow run."""
from __future__ import annotations

import time

from mlflow.entities import Metric
from ray.tune import Callback

from regft import phases
from regft.tracking import MLflowTrialCallback


class PhaseCallback(Callback):
    """Logs `phase/<name>_s`, `phase/wall_s` and `phase/non_training_share` to the trial's run
    (found through `tracking`, the search's MLflow callback) when the trial completes. It must
    come before `tracking` in the callbacks list: tracking ends the run in its own
    on_trial_complete, and the phases go in while the run is still open."""

    def __init__(self, tracking: MLflowTrialCallback):
        self.tracking = tracking
        self._pending: dict[str, float] = {}
        self._actor: dict[str, float] = {}
        self._last: dict[str, tuple[float, dict]] = {}

    def on_step_begin(self, iteration, trials, **info):
        now = time.time()
        for t in trials:
            if t.status == "PENDING":
                self._pending.setdefault(t.trial_id, now)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._actor[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        self._last[trial.trial_id] = (time.time(), {k: v for k, v in result.items()
                                                    if phases.is_phase_key(k)})

    def on_trial_complete(self, iteration, trials, trial, **info):
        tid = trial.trial_id
        received, last = self._last.get(tid, (None, {}))
        seconds = phases.driver_phases(pending_at=self._pending.get(tid), actor_at=self._actor.get(tid),
                                       last=last, received_at=received, complete_at=time.time())
        step = int((trial.last_result or {}).get("epoch", 0))
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in phases.summary_metrics(seconds).items()]
        if metrics:
            self.tracking.client.log_batch(self.tracking.run_id_for(trial), metrics=metrics)
