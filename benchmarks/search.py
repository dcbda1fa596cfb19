"""ASHA vs FIFO at the same trial budget, and the alpha sweep's cost per trial.

    python benchmarks/search.py --task cars --num-samples 6 --epochs 3

Runs the same smoke search (same seed, so Optuna proposes the same first configurations) twice
on a local Ray, once with ASHA and once with FIFO, and reports for each: wall time of the search
(first trial start to last trial end, so dataset generation is excluded), trials run to the
end, total trial-epochs trained, and the
best selection value found. From every finished trial's progress it also reports the time of the
final iteration (alpha sweep + final evaluation, no training) against the mean epoch time.

Every trial's wall time is broken into named phases (regft.phases: scheduling wait, worker group
start, model build, data pipeline start, train, eval, alpha sweep, report-only sweeps,
checkpoints, teardown), read back from the trial's MLflow run (`phase/<name>_s`) and printed as
a markdown table per trial. The 13-epoch shapes smoke trial's breakdown:

    python benchmarks/search.py --task shapes --num-samples 1 --epochs 13 --schedulers fifo

`--phases-of ROOT NAME` prints the same tables for a search run by any command with
`--tracking-uri sqlite:///ROOT/mlflow.db --name NAME` (the real-size job: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _progress(experiment_path: str):
    from ray.tune import ExperimentAnalysis

    return ExperimentAnalysis(experiment_path).trial_dataframes


def trial_phases(root: Path, name: str) -> list[tuple[str, dict[str, float]]]:
    """[(trial id, {phase: seconds, 'wall': ...})] of the search's trials, from MLflow."""
    from mlflow.tracking import MlflowClient

    from regft import phases
    from regft.mlflow_store import SEARCH_TAG, TRIAL_TAG

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=f"tags.`{SEARCH_TAG}` = '{name}'")
    out = []
    for r in runs:
        if TRIAL_TAG in r.data.tags:
            out.append((r.data.tags[TRIAL_TAG], phases.from_metrics(r.data.metrics)))
    return sorted(out)


def run_one(scheduler: str, args, root: Path) -> dict:
    from regft.tune import main

    name = f"bench-{scheduler}"
    argv = [args.task, "--preset", "smoke", "--num-samples", str(args.num_samples),
            "--epochs", str(args.epochs), "--scheduler", scheduler, "--name", name,
            "--storage", str(root / "store"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}",
            "--seed", str(args.seed)]
    if args.ingest:
        argv += ["--ingest", args.ingest]
    t0 = time.time()
    rc = main(argv)
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"search with {scheduler} failed (exit {rc})")
    frames = _progress(str(root / "store" / "searches" / name))
    epochs_total, finished, final_iter, epoch_iter, best = 0, 0, [], [], float("-inf")
    starts, ends = [], []
    for df in frames.values():
        if df.empty:
            continue
        starts.append(float(df["timestamp"].iloc[0] - df["time_this_iter_s"].iloc[0]))
        ends.append(float(df["timestamp"].iloc[-1]))
        is_final = df["final"].fillna(False).astype(bool) if "final" in df else df["epoch"] * 0
        epoch_rows, final_rows = df[~is_final], df[is_final]
        epochs_total += len(epoch_rows)
        epoch_iter += list(epoch_rows["time_this_iter_s"].iloc[1:])  # first epoch includes start-up
        if len(final_rows):
            finished += 1
            final_iter += list(final_rows["time_this_iter_s"])
            best = max(best, float(final_rows["select_metric"].iloc[-1]))
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    # the search itself: first trial start to last trial end (the first run also generates
    # the dataset, which `wall` would include)
    return {"scheduler": scheduler, "wall_s": max(ends) - min(starts), "command_s": wall,
            "phases": trial_phases(root, name),
            "trials": len(frames), "finished": finished,
            "trial_epochs": epochs_total, "best_select": best,
            "alpha_sweep_s": mean(final_iter), "epoch_s": mean(epoch_iter)}


def print_phases(rows: list[dict]) -> None:
    from regft import phases

    for r in rows:
        for trial_id, seconds in r["phases"]:
            wall = seconds.pop("wall", None)
            print(f"\n{r['scheduler']} trial {trial_id}: phases (s; share of the trial's wall "
                  "time, its actor's start to its end; scheduling wait is outside it)")
            print(phases.markdown(seconds, wall))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="cars")
    p.add_argument("--num-samples", type=int, default=6)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schedulers", default="fifo,asha",
                   help="comma-separated, run in this order (the first also makes the dataset)")
    p.add_argument("--ingest", choices=("ray_data", "worker"),
                   help="the trials' train-split ingest (default: the preset's)")
    p.add_argument("--phases-of", nargs=2, metavar=("ROOT", "NAME"),
                   help="only print the phase tables of search NAME already run with --tracking-uri "
                        "sqlite:///ROOT/mlflow.db (e.g. the real-size job), then exit")
    args = p.parse_args(argv)
    if args.phases_of:
        root, name = args.phases_of
        if not (Path(root) / "mlflow.db").is_file():
            p.error(f"--phases-of: {root}/mlflow.db does not exist")
        print_phases([{"scheduler": name, "phases": trial_phases(Path(root), name)}])
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = [run_one(s, args, root) for s in args.schedulers.split(",")]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    print(f"command: python benchmarks/search.py {' '.join(argv or sys.argv[1:])}")
    print(f"{'scheduler':<10}{'wall s':>9}{'trials':>8}{'finished':>10}{'trial-epochs':>14}"
          f"{'best select':>13}{'alpha sweep s':>15}{'epoch s':>9}")
    for r in rows:
        print(f"{r['scheduler']:<10}{r['wall_s']:>9.1f}{r['trials']:>8}{r['finished']:>10}"
              f"{r['trial_epochs']:>14}{r['best_select']:>13.4f}{r['alpha_sweep_s']:>15.2f}"
              f"{r['epoch_s']:>9.2f}")
    print_phases(rows)
    if len(rows) != 2:
        return 0
    fifo, asha = rows
    print(f"ASHA / FIFO wall time: {asha['wall_s'] / fifo['wall_s']:.2f}x; trial-epochs "
          f"{asha['trial_epochs']} vs {fifo['trial_epochs']}; alpha sweep = "
          f"{fifo['alpha_sweep_s'] / fifo['epoch_s']:.2f} epochs per trial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
