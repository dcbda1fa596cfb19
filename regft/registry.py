"""The export (regft.export) in MLflow: logged to a run and registered as a pyfunc model.

- `log_export(tracking_uri, run_id, folder, registered_name)`: the export folder as plain run
  artifacts (`regft_model/`, what `regft.predict RUN_ID` downloads) and as a pyfunc model
  registered under `registered_name` (a new version each time).
- The pyfunc model is logged *from code* (`regft/pyfunc_model.py`), not as a cloudpickled object:
  loading it runs that file and `load_export` on its artifacts (safetensors + JSON only). The
  loading environment needs `regft` installed.
- `RegftPyfuncModel.predict(images)`: images as a list (or a one-column DataFrame/Series, or a
  (N, H, W, 3) uint8 array) of file paths, encoded bytes or uint8 arrays -> a DataFrame with
  `label` (top-1 class name), `probability` (its probability) and `probabilities` (one per class,
  in label order: `model.metadata["classnames"]` / the export's JSON).
"""
from __future__ import annotations

import os
import re
import sys
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.artifacts import download_artifacts
from mlflow.tracking import MlflowClient

from regft import checkpoint, store
from regft.cli import redact, shorten
from regft.errors import UserError
from regft.export import META_FILE, export_checkpoint, find_export, load_export, read_meta
from regft.mlflow_store import check_tracking_uri, resolve_tracking_uri

ARTIFACT_PATH = "regft_model"  # the export folder under the run's artifacts
PYFUNC_NAME = "classifier"  # the logged pyfunc model's name
CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
CHECKPOINT_PATH_KEY = "checkpoint_path"  # set by ray.tune's TuneReportCallback on a result


def images_from_input(model_input) -> list:
    """pyfunc input -> a list of images (paths, bytes, uint8 arrays, PIL images)."""
    if isinstance(model_input, pd.DataFrame):
        col = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[col])
    if isinstance(model_input, pd.Series):
        return list(model_input)
    if isinstance(model_input, np.ndarray) and model_input.dtype == np.uint8:
        return list(model_input) if model_input.ndim == 4 else [model_input]
    if isinstance(model_input, np.ndarray):  # object array of paths/bytes
        return list(model_input.ravel())
    if isinstance(model_input, (str, bytes, bytearray, os.PathLike)):
        return [model_input]
    return list(model_input)


def prediction_frame(pred) -> pd.DataFrame:
    return pd.DataFrame({
        "label": pred.labels,
        "probability": pred.probabilities.max(axis=1).astype(np.float64) if len(pred.labels) else [],
        "probabilities": [row.astype(np.float64).tolist() for row in pred.probabilities],
    })


class RegftPyfuncModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper of an export folder (artifact `export`)."""

    def load_context(self, context):
        self.model = load_export(find_export(context.artifacts["export"]))

    # The DataFrame hint is one MLflow infers no schema from (so it neither converts nor
    # warns); lists, Series and uint8 arrays of images are accepted as well.
    def predict(self, context, model_input: pd.DataFrame, params=None):
        # a batch_size param overrides the export's own default (ExportedClassifier.predict)
        kwargs = {"batch_size": int(params["batch_size"])} if params and "batch_size" in params else {}
        return prediction_frame(self.model.predict(images_from_input(model_input), **kwargs))


def _requirements() -> list[str]:
    reqs = []
    for dist in ("regft", "mlflow", "torch", "torchvision", "open_clip_torch", "safetensors",
                 "pillow", "numpy", "pandas"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            reqs.append(dist)
    return reqs


def log_export(tracking_uri: str, run_id: str, folder: str | Path,
               registered_name: str | None) -> dict:
    """Log `folder` to run `run_id` (artifacts + pyfunc model) and register it.

    Returns {"artifact_uri", "model_uri", "registered_name", "version"} (version None when not
    registered). Raises whatever MLflow raises; the caller decides whether that is fatal.
    """
    meta = read_meta(folder)
    client = MlflowClient(tracking_uri)
    client.log_artifacts(run_id, str(folder), ARTIFACT_PATH)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        # a run that is already active elsewhere in this process is left alone
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = mlflow.pyfunc.log_model(
                name=PYFUNC_NAME,
                python_model=str(CODE_FILE),
                artifacts={"export": str(folder)},
                pip_requirements=_requirements(),
                registered_model_name=registered_name,
                metadata={"classnames": meta["classnames"], "alpha": meta["alpha"],
                          "format": meta["format"], "weights_sha256": meta["weights_sha256"]},
            )
    finally:
        mlflow.set_tracking_uri(previous)
    version = getattr(info, "registered_model_version", None)
    return {"artifact_uri": f"runs:/{run_id}/{ARTIFACT_PATH}", "model_uri": info.model_uri,
            "registered_name": registered_name if version is not None else None,
            "version": version}


def download_export(model: str, tracking_uri: str, dst: str | Path) -> Path:
    """An MLflow run id, a registered version's files (`_registered_source`) or any MLflow
    artifact URI -> the local export folder, downloaded under `dst`. Only files are fetched;
    nothing is unpickled."""
    uri = f"runs:/{model}/{ARTIFACT_PATH}" if RUN_ID.match(model) else model
    previous = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a few small files: no bar
    try:
        local = download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = previous
    return find_export(local)


# ------------------------------------------------------------- end of a search ----
def best_checkpoint(results, trial_id: str, trial_run_root: str):
    """The final (ensembled) checkpoint of a trial as a ray.train.Checkpoint: the one its last
    result names, else (a resumed trial that had finished repeats its final report without one)
    the newest checkpoint under its Train run folder whose meta says final; None if neither."""
    from ray.train import Checkpoint  # ray only here: predict/evaluate import this module

    # Tune names a checkpoint by its path on the storage's filesystem (no scheme: for
    # s3://bucket/x it is bucket/x), which is the filesystem of the trial's run folder
    fs, root = store.filesystem(trial_run_root)
    for r in results:
        metrics = r.metrics or {}
        path = metrics.get(CHECKPOINT_PATH_KEY) if metrics.get("trial_id") == trial_id else None
        if path:
            return Checkpoint(path) if store.is_uri(path) else Checkpoint(path, fs)
    final = checkpoint.find_final(fs, root)
    return Checkpoint(final, fs) if final is not None else None


def deliver_best(results, best, *, client, tracking_uri: str, parent_id: str, search_name: str,
                 trial_run_root: str, export_dir: str, registered_name: str, task,
                 dataset_path: str, evaluation: dict) -> dict:
    """End of a search: export the best trial's ensembled model to `export_dir`, log it to the
    parent run and register it as `registered_name`. Never raises: a failed export or
    registration is a warning (the search's results stand; the export is kept if written).
    Returns {"export": folder or None, "model_uri": models:/NAME/VERSION or None}."""
    out: dict = {"export": None, "model_uri": None}
    trial_id = str(best.get("trial_id"))
    try:
        folder = Path(export_dir)
        if (folder / META_FILE).is_file() and read_meta(folder).get("trial_id") == trial_id:
            pass  # a resumed search that had exported already
        else:
            ckpt = best_checkpoint(results, trial_id, trial_run_root)
            if ckpt is None:
                raise FileNotFoundError(f"no final checkpoint of trial {trial_id} under {trial_run_root}")
            with ckpt.as_directory() as d:
                export_checkpoint(
                    d, folder, dataset_id=Path(dataset_path.rstrip("/")).name,
                    task={"name": task.name, "real_test": task.real_test,
                          "generation_classnames": list(task.gen_names)},
                    mlflow={"run_id": parent_id, "registered_name": registered_name,
                            "experiment_id": client.get_run(parent_id).info.experiment_id},
                    evaluation=evaluation, extra={"search": search_name, "trial_id": trial_id})
        out["export"] = str(folder)
        client.set_tag(parent_id, "regft.export", str(folder))
    except Exception as e:  # the search itself succeeded: report, do not fail it
        print(f"warning: could not export the best model of search {search_name}: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return out
    tags = client.get_run(parent_id).data.tags
    if tags.get("regft.model_uri"):  # registered before this resume
        out["model_uri"] = tags["regft.model_uri"]
        return out
    try:
        info = log_export(tracking_uri, parent_id, folder, registered_name)
        if info["version"] is not None:
            out["model_uri"] = f"models:/{info['registered_name']}/{info['version']}"
            client.set_tag(parent_id, "regft.model_uri", out["model_uri"])
    except Exception as e:
        print(f"warning: exported to {folder}, but logging/registering it in MLflow failed: "
              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
    return out


# ------------------------------------------------------------- MODEL arguments ----
RUN_ID = re.compile(r"^[0-9a-f]{32}$")  # an MLflow run id
MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))/?$")
ERROR_CHARS = 300  # of MLflow's first error line, quoted in ours
VERSIONS_LISTED = 5  # existing versions / registered models named when one is not found


def _plain(text: str, limit: int = 60) -> str:
    """`text` as it is when short and printable (a name, a path), else cli.shorten's bounded form."""
    return text if len(text) <= limit and text.isprintable() else shorten(text, limit)


def resolve_model(model: str, tracking_uri: str | None, tmp: str) -> Path:
    """The MODEL argument of regft.predict / regft.evaluate -> a local export folder: a folder as
    it is, an MLflow run id (the search's parent run), runs:/ or models:/NAME/VERSION (or
    models:/NAME@ALIAS, models:/NAME/latest) downloaded into `tmp`, every lookup against
    `tracking_uri` (else $MLFLOW_TRACKING_URI, else ./mlflow.db). Reading a model creates no
    store: a sqlite database that does not exist is refused. Anything else, or an MLflow that
    cannot serve it, is a UserError naming the fix."""
    path = Path(model).expanduser()
    if path.exists():
        return find_export(path)
    if not (model.startswith(("models:/", "runs:/")) or RUN_ID.match(model)):
        raise UserError(f"MODEL {_plain(model)}: no such folder, and not an MLflow run id (32 hex "
                        "digits) or models:/NAME/VERSION")
    uri = resolve_tracking_uri(tracking_uri)
    problems = check_tracking_uri(uri) + _missing_database(uri, tracking_uri)
    if problems:  # seconds, instead of MLflow's minutes of retries; nothing created
        raise UserError(problems)
    try:
        source = _registered_source(model, uri) if model.startswith("models:/") else model
        return download_export(source, uri, tmp)
    except UserError:
        raise
    except Exception as e:  # MlflowException, missing artifacts: one line, exit 2
        first = str(e).strip().splitlines()[0][:ERROR_CHARS] if str(e).strip() else type(e).__name__
        raise UserError(f"MODEL {_plain(model)}: cannot fetch it from MLflow at {redact(uri)} "
                        f"({redact(first)}); check the run id / models:/NAME/VERSION and "
                        "--tracking-uri") from e


def _missing_database(uri: str, given: str | None) -> list[str]:
    """A sqlite store that does not exist holds no model; MLflow would create an empty one."""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        flag = "--tracking-uri" if given else "the default tracking store (--tracking-uri)"
        return [f"{flag} {redact(uri)}: no such database file; give the tracking URI the search "
                "logged to (its summary prints it)"]
    return []


def _registered_source(model: str, uri: str) -> str:
    """models:/NAME/VERSION (or @ALIAS, /latest) -> where that version's files are, looked up in
    the registry at `uri` (MLflow's own resolution of models:/ reads the process-wide registry
    URI, not the one given: it would read and create ./mlflow.db)."""
    m = MODEL_URI.match(model)
    if m is None:
        raise UserError(f"MODEL {_plain(model)}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = m["name"]
    versions = sorted((int(v.version) for v in client.search_model_versions(f"name = '{name}'")),
                      reverse=True)
    if not versions:
        known = [r.name for r in client.search_registered_models(max_results=VERSIONS_LISTED)]
        raise UserError(f"MODEL {_plain(model)}: no registered model {_plain(name)} at "
                        f"{redact(uri)} (registered: {', '.join(known) or 'none'}); check the "
                        "name and --tracking-uri")
    if m["alias"]:
        version = client.get_model_version_by_alias(name, m["alias"]).version
    elif m["version"] == "latest":
        version = str(versions[0])
    elif not m["version"].isdigit() or int(m["version"]) not in versions:
        shown = ", ".join(map(str, versions[:VERSIONS_LISTED]))
        raise UserError(f"MODEL {_plain(model)}: model {_plain(name)} has no version "
                        f"{_plain(m['version'], 20)} at {redact(uri)} (versions: {shown}"
                        f"{' ...' if len(versions) > VERSIONS_LISTED else ''})")
    else:
        version = m["version"]
    source = client.get_model_version_download_uri(name, version)
    logged = re.fullmatch(r"models:/(m-[0-9a-f]+)/?", source or "")
    if logged:  # an MLflow 3 logged model: its artifact location, from the same store
        source = client.get_logged_model(logged[1]).artifact_location
    return source
