"""The Ray side of the readable console (issue 15; the descriptor-level part is regft.console).

With worker output kept out of the driver (`ray.init(log_to_driver=False)`: every worker's
stdout/stderr still lands in the session's logs/worker-*.out|err files), the driver itself
prints what a person watches:

    TrialLines   a Tune callback (Tune's own reporter, kept for its status table every
                 STATUS_INTERVAL_S, without the per-trial config boxes and result tables):
                 one line per epoch per trial, one line per trial when it ends
    train_epoch_lines()   the same epoch lines for a Ray Train run without Tune: Train V2's
                 UserCallback runs on the Train controller actor, not on the driver, so it
                 sends each line through a small queue actor the driver prints from

Use `TrialLines` in RunConfig.callbacks with RunConfig(verbose=0): Tune's default reporter, at
verbosity 0, then prints only its configuration box at the start and errored trials. TrialLines
is a plain Callback holding its own TuneTerminalReporter for the table: a second AIR
ProgressReporter among the callbacks would take over Tune's heartbeat and leave the default
one without a start time, so its on_trial_error raises (Ray 2.60, ray/tune/tune.py).
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import ray
from ray.train import UserCallback
from ray.tune import Callback
from ray.tune.experimental.output import AirVerbosity, TuneTerminalReporter
from ray.util.queue import Empty, Queue

# Tune's status table every this many seconds. Tune's own is 30: on the 5-minute smoke search
# that is 10 tables of ~10 lines for 2 trials, more lines than all the epochs; the epoch lines
# already say how each trial goes, the table is the overview.
STATUS_INTERVAL_S = 120
# a failed trial's line shows its exception's message up to this many characters (the error
# file it names holds the whole traceback)
ERROR_LINE_CHARS = 240
# the metric columns of the status table (Tune would pick the first four it finds)
TABLE_METRICS = ["epoch", "train_loss", "select_metric"]
# How long the driver waits on the epoch-line queue before checking whether the run ended.
QUEUE_POLL_S = 0.5


def epoch_line(result: dict[str, Any], epochs: int | None, trial: str | None = None, *,
               again: bool = False) -> str:
    """`trial 75e447d1  epoch  3/13  loss 0.1726  select 0.9542  347 img/s` from an epoch report
    (regft.reports.EpochReport's wire keys); without `trial` (a Train run) it starts at `epoch`."""
    of = f"/{epochs}" if epochs else ""
    width = len(str(epochs)) if epochs else 1
    line = (f"epoch {result['epoch']:>{width}}{of}  loss {result['train_loss']:.4f}"
            f"  select {result['select_metric']:.4f}  {_rate(result['images_per_s'])} img/s")
    if again:
        line += "  (again: the run restarted from an earlier checkpoint)"
    return f"trial {trial}  {line}" if trial else line


def end_line(trial: str, last: dict[str, Any] | None, epochs: int | None, stopper: str) -> str:
    """One line for a trial that ended without an error, read from its last result: finished
    (final report), diverged, or stopped by the scheduler (`stopper`, e.g. "ASHA")."""
    last = last or {}
    of = f"/{epochs}" if epochs else ""
    if last.get("final") is True:
        return (f"trial {trial}  finished: select {last['select_metric']:.4f} (alpha "
                f"{last['best_alpha']:.2f}, best epoch {last['best_epoch']}{of})")
    if last.get("diverged") is True:
        return (f"trial {trial}  diverged at epoch {last['epoch']}{of} (loss "
                f"{last['train_loss']}): stopped, scored {last['select_metric']}")
    if "epoch" in last:
        return (f"trial {trial}  stopped early by {stopper} after epoch {last['epoch']}{of} "
                f"(select {last['select_metric']:.4f})")
    return f"trial {trial}  stopped by {stopper} before its first epoch"


class TrialLines(Callback):
    """Tune callback: the lines of the module docstring, printed on the driver, and Tune's own
    status table (its TuneTerminalReporter, held here) every STATUS_INTERVAL_S and at the end."""

    def __init__(self, epochs: int | None = None, stopper: str = "the scheduler",
                 metric: str = "select_metric", mode: str = "max"):
        self._epochs = epochs
        self._stopper = stopper
        self._last_epoch: dict[str, int] = {}
        self._table = TuneTerminalReporter(AirVerbosity.DEFAULT, metric=metric, mode=mode)
        self._table._heartbeat_freq = STATUS_INTERVAL_S
        self._table._inferred_metric = list(TABLE_METRICS)

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self._table.setup(start_time=time.time(), total_samples=total_num_samples)
        self._table._last_heartbeat_time = time.time()  # the first table after one interval

    def on_step_end(self, iteration: int, trials: list, **info):
        if not trials:
            return
        if not self._table._inferred_params:  # the table's parameter columns: the sampled ones
            self._table._inferred_params = sorted(trials[0].config)
        self._table.print_heartbeat(trials)

    def on_experiment_end(self, trials: list, **info):
        self._table.print_heartbeat(trials, force=True)

    def on_trial_start(self, iteration: int, trials: list, trial, **info):
        params = ", ".join(f"{k}={_short(v)}" for k, v in sorted(trial.config.items()))
        print(f"trial {trial.trial_id}  started: {params}", flush=True)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info):
        if result.get("final") is True or result.get("diverged") is True or "epoch" not in result:
            return  # the end line says it
        again = result["epoch"] <= self._last_epoch.get(trial.trial_id, 0)
        self._last_epoch[trial.trial_id] = result["epoch"]
        print(epoch_line(result, self._epochs, trial.trial_id, again=again), flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info):
        print(end_line(trial.trial_id, trial.last_result, self._epochs, self._stopper), flush=True)

    def on_trial_error(self, iteration: int, trials: list, trial, **info):
        epoch = (trial.last_result or {}).get("epoch")
        after = f" after epoch {epoch}" if epoch is not None else ""
        print(f"trial {trial.trial_id}  failed{after}: {error_file_line(trial.error_file)}"
              f"traceback: {trial.error_file}", flush=True)

    def on_trial_recover(self, iteration: int, trials: list, trial, **info):
        print(f"trial {trial.trial_id}  failed, retrying: see {trial.error_file}", flush=True)


def last_line(text: str) -> str:
    """The last non-blank line of `text`, stripped: the exception line that ends a traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def cut(text: str, limit: int = ERROR_LINE_CHARS) -> str:
    """`text` up to `limit` characters, "…" marking a cut."""
    return text if len(text) <= limit else text[:limit] + "…"


def error_file_line(path: str | None) -> str:
    """The exception line that ends a trial's error file (Tune writes its traceback there), cut,
    then "; "; empty when there is none to read."""
    try:
        with open(path, errors="replace") as f:
            line = last_line(f.read())
    except (OSError, TypeError):
        return ""
    return f"{cut(line)}; " if line else ""


def _rate(per_s: float) -> str:
    """Images/s to read at a glance: whole numbers, two digits below 10 (a real-size CPU epoch
    of one step runs at under one image/s, which would print as 0)."""
    return f"{per_s:.0f}" if not per_s < 10 else f"{per_s:.2g}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ----------------------------------------------------------------- Ray Train, no Tune --
class _EpochQueue(UserCallback):
    """Runs on the Train controller actor: rank 0's report of every epoch, as a line, into the
    queue the driver prints from."""

    def __init__(self, queue: Queue, epochs: int | None):
        self._queue = queue
        self._epochs = epochs

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint):
        report = metrics[0] if metrics else {}
        if "epoch" in report and report.get("final") is not True and report.get("diverged") is not True:
            self._queue.put(epoch_line(report, self._epochs))


@contextlib.contextmanager
def train_epoch_lines(epochs: int | None = None) -> Iterator[UserCallback]:
    """A UserCallback for ray.train.RunConfig(callbacks=[...]); while the block runs, a driver
    thread prints the epoch lines it sends."""
    queue = Queue(actor_options={"num_cpus": 0})  # bookkeeping only: takes no CPU from training
    done = threading.Event()

    def show():
        while not done.is_set() or not queue.empty():
            try:
                print(queue.get(timeout=QUEUE_POLL_S), flush=True)
            except Empty:
                continue

    thread = threading.Thread(target=show, name="train-epoch-lines", daemon=True)
    thread.start()
    try:
        yield _EpochQueue(queue, epochs)
    finally:
        done.set()
        thread.join(QUEUE_POLL_S * 4)
        queue.shutdown()


def ray_logs_dir() -> str | None:
    """The session's log folder (workers' stdout/stderr), for the summary's "full logs" line."""
    try:  # no public API names it in Ray 2.60
        return ray._private.worker._global_node.get_logs_dir_path()
    except Exception:  # not initialised, or a client connection
        return None
