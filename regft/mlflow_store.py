"""MLflow bookkeeping without Ray: where the tracking store is (and whether it answers), the
tags that tie a search's runs together, parameters and metrics in MLflow's terms, and finding or
closing runs. regft.tracking (the Ray Tune callback) and regft.registry (which serves models to
regft.predict, where Ray must not be imported) build on it. Functions take an `MlflowClient`;
this module imports neither MLflow nor Ray.
"""
from __future__ import annotations

import math
import os
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from regft.cli import redact
from regft.reports import BOOKKEEPING_KEYS

HEALTH_TIMEOUT_S = 5.0  # a tracking server that does not answer /health by then is down
PARAM_CHARS = 6000  # MLflow's limit on a parameter value
TRIAL_TAG = "regft.trial_id"
SEARCH_TAG = "regft.search"
PARENT_TAG = "mlflow.parentRunId"


def default_tracking_uri(cwd: str | Path | None = None) -> str:
    """The embedded default: a sqlite file in the working directory (`mlflow ui` opens it)."""
    path = Path(cwd or os.getcwd()).resolve() / "mlflow.db"
    return f"sqlite:///{path}"


def resolve_tracking_uri(uri: str | None) -> str:
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def check_tracking_uri(uri: str, timeout: float = HEALTH_TIMEOUT_S) -> list[str]:
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
    """MLflow params are strings of at most PARAM_CHARS; redact and stringify."""
    out = {}
    for k, v in redact(params).items():
        s = str(v)
        out[str(k)] = s if len(s) <= PARAM_CHARS else s[:PARAM_CHARS - 3] + "..."
    return out


def numeric_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a report (or a Tune result, less Tune's and Train's bookkeeping)."""
    out = {}
    for k, v in result.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or k in BOOKKEEPING_KEYS:
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
