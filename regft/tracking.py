"""MLflow tracking of a search's trials: one nested child run per Tune trial, written by a
driver-side Ray Tune callback (the URI rules, tags and run lookups without Ray are
regft.mlflow_store).

Child runs are created and written by a driver-side Tune callback with explicit run ids
(`MlflowClient`), not by `setup_mlflow` inside trials: that keeps exactly one run per trial,
lets the driver log figures, and survives `Tuner.restore` — a resumed trial finds its run again
by the `regft.trial_id` tag instead of opening a duplicate.
"""
from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from typing import Any

import matplotlib
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.tune import Callback

from regft.mlflow_store import PARENT_TAG, SEARCH_TAG, TRIAL_TAG, find_run, flat_params, numeric_metrics
from regft.reports import DivergedReport, FinalReport
from regft.search_space import generation_fields, generation_key, split_config
from regft.searcher import is_report

matplotlib.use("Agg")  # figures are drawn in the driver, never shown (before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402

ALPHA_STEPS = 100  # alpha curves are logged as metric steps in percent (MLflow steps are integers)
MAX_DIGEST_CHARS = 36  # MLflow's limit on a dataset digest (its database column)
DATASET_CONTEXT = "mlflow.data.context"  # the input tag the UI shows as the dataset's role


@dataclass(frozen=True)
class DatasetLineage:
    """One dataset a search trains on: what the MLflow Datasets column and the parent run show."""

    dataset_id: str
    path: str  # store path or URI
    images: int
    generated: int  # images this search's generation made for it (0: reused or served)
    splits: dict  # {"train": n, "val": n} under the trials' val_fraction
    settings: dict  # the generation values that differ between the search's datasets
    derived_from: str | None = None  # the larger dataset whose first images per class it is

    def digest(self) -> str:
        """The dataset id, or (an id longer than MLflow takes) its content hash, the id's tail."""
        if len(self.dataset_id) <= MAX_DIGEST_CHARS:
            return self.dataset_id
        return self.dataset_id.rsplit("-", 1)[-1]


class _StoreDataset(MetaDataset):
    """An MLflow Dataset that is only metadata: name and digest = the dataset id, source = its
    store path, profile = its image counts per split."""

    def __init__(self, lineage: DatasetLineage):
        self._lineage = lineage
        try:
            source = resolve_dataset_source(lineage.path)
        except MlflowException:  # a scheme MLflow has no source type for (memory://, ...)
            source = resolve_dataset_source(lineage.path.split("://", 1)[-1])
        super().__init__(source, name=lineage.dataset_id, digest=lineage.digest())

    @property
    def profile(self) -> dict:
        return {"images": self._lineage.images, **{f"{k}_images": v for k, v in self._lineage.splits.items()}}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def dataset_input(lineage: DatasetLineage, context: str) -> DatasetInput:
    """`lineage` as a run input (what mlflow.log_input logs), tagged with its role."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways": a local path
        entity = _StoreDataset(lineage)._to_mlflow_entity()
    return DatasetInput(dataset=entity, tags=[InputTag(key=DATASET_CONTEXT, value=context)])


def log_datasets(client: MlflowClient, run_id: str, lineages: list[DatasetLineage], context: str) -> None:
    client.log_inputs(run_id, datasets=[dataset_input(x, context) for x in lineages])


def trial_dataset(config: dict, datasets: dict[str, DatasetLineage]) -> DatasetLineage | None:
    """The dataset a trial of sampled `config` trains on (by its generation values)."""
    _, values = split_config(dict(config))
    return datasets.get(generation_key(generation_fields(values)))


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
                 static_params: dict[str, Any], search_name: str,
                 datasets: dict[str, DatasetLineage] | None = None):
        self.datasets = datasets or {}  # generation key -> the dataset its trials train on
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
            lineage = trial_dataset(trial.config, self.datasets)
            if lineage is not None:
                params["dataset_id"] = lineage.dataset_id
                log_datasets(self.client, run_id, [lineage], "train")
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
