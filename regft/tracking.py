"""MLflow tracking for searches: one experiment per task, a parent run per search, one nested
child run per Tune trial.

Child runs are created and written by a driver-side Tune callback with explicit run ids
(`MlflowClient`), not by `setup_mlflow` inside trials: that keeps exactly one run per trial,
lets the driver log figures, and survives `Tuner.restore` — a resumed trial finds its run again
by the `regft.trial_id` tag instead of opening a duplicate.
"""
from __future__ import annotations

import math
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ray.tune import Callback

from regft.cli import redact  # noqa: F401 (one redaction rule for logs, errors and MLflow)

TRIAL_TAG = "regft.trial_id"
SEARCH_TAG = "regft.search"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The embedded default: a sqlite file in the working directory (`mlflow ui` opens it)."""
    path = Path(cwd or os.getcwd()).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking_uri(uri: str, timeout: float = 5.0) -> list[str]:
    """Problems reaching the tracking store (empty list: reachable). Cheap, no run is created."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (user's server)
                if resp.status != 200:
                    return [f"--tracking-uri {uri}: server answered {resp.status} on /health"]
        except (OSError, ValueError) as e:
            reason = getattr(e, "reason", e)
            return [f"--tracking-uri {uri}: tracking server unreachable ({reason}); start it "
                    "(scripts/mlflow_server.sh) or drop --tracking-uri to use the local store"]
        return []
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if db is None or not db.is_absolute():
            return [f"--tracking-uri {uri}: use an absolute sqlite path, sqlite:////abs/path/mlflow.db"]
        parent = db.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            return [f"--tracking-uri {uri}: folder {parent} does not exist or is not writable"]
        return []
    if parsed.scheme in ("", "file"):
        return [f"--tracking-uri {uri}: MLflow refuses plain-folder stores; use "
                f"{default_tracking_uri()} (sqlite) or an http(s) tracking server"]
    return []  # databricks, postgresql, ...: let MLflow itself validate


def flat_params(params: dict[str, Any]) -> dict[str, str]:
    """MLflow params are strings of at most 6000 chars; redact and stringify."""
    out = {}
    for k, v in redact(params).items():
        s = str(v)
        out[str(k)] = s if len(s) <= 6000 else s[:5997] + "..."
    return out


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if k in ("training_iteration", "timestamp", "time_this_iter_s", "time_total_s", "pid",
                 "time_since_restore", "iterations_since_restore", "timesteps_total"):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        out[k] = float(v)
    return out


def get_or_create_experiment(client, name: str, artifact_location: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=artifact_location)


def find_run(client, experiment_id: str, tags: dict[str, str]):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=2)
    return runs[0] if runs else None


def close_orphan_runs(client, experiment_id: str, parent_id: str, trial_ids) -> list[str]:
    """End the child runs of `parent_id` still RUNNING whose trial is not in `trial_ids` (the
    trials the finished search knows). A driver killed right after a trial started can lose that
    trial from Tune's saved state: `--resume` never restarts it (it samples a new one), so its
    run would stay RUNNING forever. It is marked KILLED with `regft.outcome=orphaned`, not
    deleted (whatever it logged stays). Returns their trial ids."""
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{PARENT_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'"))
    keep = {str(t) for t in trial_ids}
    orphans = [r for r in runs if r.data.tags.get(TRIAL_TAG) not in keep]
    for r in orphans:
        client.set_tag(r.info.run_id, "regft.outcome", "orphaned")
        client.set_terminated(r.info.run_id, status="KILLED")
    return [r.data.tags.get(TRIAL_TAG) for r in orphans]


def alpha_curve_figure(curves: dict[str, list], selected: float | None, title: str):
    """Accuracy vs alpha, one line per split; the selected alpha marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
            from mlflow.tracking import MlflowClient

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
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in numeric_metrics(result).items()]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)
        if result.get("final"):
            self._log_final(run_id, trial, result)

    def _log_final(self, run_id, trial, result):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        curves = final_curves(result)
        points = []
        for split, curve in curves.items():
            # metric steps are integers: step = alpha in percent
            points += [Metric(f"alpha_curve/{split}", m, now, int(round(a * 100))) for a, m in curve]
        if points:
            self.client.log_batch(run_id, metrics=points)
        if curves:
            fig = alpha_curve_figure(curves, result.get("best_alpha"), f"trial {trial.trial_id}")
            self.client.log_figure(run_id, fig, "alpha_curve.png")
            import matplotlib.pyplot as plt

            plt.close(fig)

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        run_id = self.run_id_for(trial)
        if last.get("diverged"):  # NaN/inf loss: the trial stopped itself (regft.train)
            self.client.set_tag(run_id, "regft.outcome", "diverged")
            self.client.set_tag(run_id, "regft.diverged", "true")
            self.client.set_terminated(run_id, status="FAILED")
            return
        status = "FINISHED" if last.get("final") else "KILLED"
        self.client.set_tag(run_id, "regft.outcome", "finished" if status == "FINISHED" else "stopped early")
        self.client.set_terminated(run_id, status=status)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id_for(trial)
        self.client.set_tag(run_id, "regft.outcome", "error")
        self.client.set_terminated(run_id, status="FAILED")
