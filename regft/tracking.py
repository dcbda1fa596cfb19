"""MLflow tracking of a search's trials: one nested child run per Tune trial, written by a
driver-side Ray Tune callback (the URI rules, tags and run lookups without Ray are
regft.mlflow_store).

Child runs are created and written by a driver-side Tune callback with explicit run ids
(`MlflowClient`), not by `setup_mlflow` inside trials: that keeps exactly one run per trial,
lets the driver log figures, and survives `Tuner.restore` — a resumed trial finds its run again
by the `regft.trial_id` tag instead of opening a duplicate.
"""
from __future__ import annotations

import time
from typing import Any

import matplotlib
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from regft.mlflow_store import PARENT_TAG, SEARCH_TAG, TRIAL_TAG, find_run, flat_params, numeric_metrics
from regft.reports import DivergedReport, FinalReport
from regft.searcher import is_report

matplotlib.use("Agg")  # figures are drawn in the driver, never shown (before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402

ALPHA_STEPS = 100  # alpha curves are logged as metric steps in percent (MLflow steps are integers)


def alpha_curve_figure(curves: dict[str, list], selected: float | None, title: str):
    """Accuracy vs alpha, one line per split; the selected alpha marked."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for split, curve in curves.items():
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker="o", label=split)
    if selected is not None:
        ax.axvline(selected, color="gray", linestyle="--", label=f"selected alpha={selected:g}")
    ax.set_xlabel("alpha (0 = zero-shot, 1 = fine-tuned)")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def final_curves(result: dict[str, Any]) -> dict[str, list]:
    """alpha curves in a final trial result: `alpha_curve` (selection split) + `alpha_curve_<split>`."""
    curves = {}
    for k, v in result.items():
        if k.startswith("alpha_curve") and isinstance(v, (list, tuple)) and v:
            split = k[len("alpha_curve_"):] if k != "alpha_curve" else "select"
            curves[split] = [(float(a), float(m)) for a, m in v]
    return curves


class MLflowTrialCallback(Callback):
    """Driver-side Tune callback: one nested MLflow run per trial, found again on resume."""

    def __init__(self, tracking_uri: str, experiment_id: str, parent_run_id: str,
                 static_params: dict[str, Any], search_name: str):
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.static_params = static_params
        self.search_name = search_name
        self._runs: dict[str, str] = {}
        self._client = None

    def __getstate__(self):
        # Tune pickles callbacks into its experiment state; the client (a DB/HTTP handle) is
        # re-created on demand after a restore
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self):
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def run_id_for(self, trial) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        existing = find_run(self.client, self.experiment_id,
                            {TRIAL_TAG: tid, PARENT_TAG: self.parent_run_id})
        if existing is not None:
            run_id = existing.info.run_id
            if existing.info.status != "RUNNING":
                self.client.update_run(run_id, status="RUNNING")
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"trial-{tid}",
                tags={TRIAL_TAG: tid, PARENT_TAG: self.parent_run_id, SEARCH_TAG: self.search_name},
            )
            run_id = run.info.run_id
            params = {**self.static_params, **dict(trial.config)}
            for k, v in flat_params(params).items():
                self.client.log_param(run_id, k, v)
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_id_for(trial)
        step = int(result["epoch"])  # every report has it: the final one repeats the last epoch
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if is_report(result, FinalReport):
            self._log_final(run_id, trial, result)

    def _log_final(self, run_id, trial, result):
        now = int(time.time() * 1000)
        curves = final_curves(result)
        points = []
        for split, curve in curves.items():
            points += [Metric(f"alpha_curve/{split}", m, now, int(round(a * ALPHA_STEPS)))
                       for a, m in curve]
        if points:
            self.client.log_batch(run_id, metrics=points)
        if curves:
            fig = alpha_curve_figure(curves, result["best_alpha"], f"trial {trial.trial_id}")
            self.client.log_figure(run_id, fig, "alpha_curve.png")
            plt.close(fig)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}  # a trial may end before it reports anything
        run_id = self.run_id_for(trial)
        if is_report(last, DivergedReport):  # NaN/inf loss: the trial stopped itself (regft.train)
            self.client.set_tag(run_id, "regft.outcome", "diverged")
            self.client.set_tag(run_id, "regft.diverged", "true")
            self.client.set_terminated(run_id, status="FAILED")
            return
        status = "FINISHED" if is_report(last, FinalReport) else "KILLED"
        self.client.set_tag(run_id, "regft.outcome", "finished" if status == "FINISHED" else "stopped early")
        self.client.set_terminated(run_id, status=status)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id_for(trial)
        self.client.set_tag(run_id, "regft.outcome", "error")
        self.client.set_terminated(run_id, status="FAILED")
