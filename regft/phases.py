"""Where a trial's wall time goes: named phases, timed in one place (pure: stdlib only).

A `Phases` recorder sums the seconds spent in each named phase (`with phases("eval"): ...`, or
`phases.add(name, seconds)` for an interval measured elsewhere, e.g. between two processes'
wall clocks). `metrics()` gives them as report keys `phase/<name>_s`: the worker sends its
running totals with every report, so the trial's MLflow run holds each phase's total (its last
value) and its growth per epoch (the steps). Phase keys are timings, not results: the report
readers (regft.reports.parse_result) set them aside, and two runs of the same trial differ in
them and in nothing else.

The phases of one trial, in the order they happen (`PHASES`); the first three and the last are
measured by the driver (regft.trial_phases), the rest by the Ray Train worker (regft.train):

    scheduling_wait     the trial waits for resources (Tune: pending -> its actor started)
    trial_start         the trial's actor starts and calls the trial function
    trainer_build       the trainer is built: splits counted, train split read into the store
    worker_group_start  Train's controller and worker group start, until the worker function runs
    model_build         CLIP built, zero-shot head from the prompts (or read from the shared store)
    eval_setup          the evaluation splits opened (decoded now or at their first evaluation)
    data_start          the first training batch of the run (Ray Data's pipeline starts)
    train               training steps, all epochs (less data_start)
    eval                per-epoch evaluation (synthetic_val accuracy + embeddings)
    checkpoint          epoch checkpoints written and reported
    alpha_sweep         the selection split's alpha sweep
    report_sweeps       the report-only curves and zero-shot / fine-tuned / ensemble numbers
    final_checkpoint    the ensemble's weights written and reported
    teardown            last report -> the trial is complete (worker group, controller stop)
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PREFIX = "phase/"
SUFFIX = "_s"
PHASES = ("scheduling_wait", "trial_start", "trainer_build", "worker_group_start", "model_build",
          "eval_setup", "data_start", "train", "eval", "checkpoint", "alpha_sweep",
          "report_sweeps", "final_checkpoint", "teardown")
# phases that do not train: the share of a trial's wall time that is overhead
TRAINING = ("train",)
OUTSIDE_WALL = ("scheduling_wait",)  # before the trial's actor starts: not in its wall time
# wall-clock stamps (time.time()) the worker sends with its phases, from which the driver's
# callback times the phases around the worker: when the trial function started, and when
# this report was sent (so the final one's delivery, its checkpoint included, is timed too)
TRIAL_FN_AT = f"{PREFIX}trial_fn_at"
SENT_AT = f"{PREFIX}sent_at"


def key(name: str) -> str:
    """The report / MLflow metric key of phase `name`."""
    return f"{PREFIX}{name}{SUFFIX}"


def is_phase_key(k: str) -> bool:
    """A phase's seconds or one of the stamps: timings that a report reader sets aside."""
    return k.startswith(PREFIX)


def is_stamp_key(k: str) -> bool:
    """One of the worker's wall-clock stamps: for the driver's timing, not a metric to log."""
    return k in (TRIAL_FN_AT, SENT_AT)


def _is_seconds(k: str) -> bool:
    return k.startswith(PREFIX) and k.endswith(SUFFIX)


class Phases:
    """Seconds per named phase, summed over every time the phase runs."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, float(seconds))

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = self.clock()
        try:
            yield
        finally:
            self.add(name, self.clock() - t0)

    def metrics(self) -> dict[str, float]:
        """{phase/<name>_s: seconds}, in PHASES order."""
        return {key(n): self.seconds[n] for n in PHASES if n in self.seconds}

    def move(self, source: str, target: str, seconds: float) -> None:
        """Book `seconds` of what was timed as `source` as `target` instead."""
        seconds = min(max(0.0, seconds), self.seconds.get(source, 0.0))
        self.seconds[source] = self.seconds.get(source, 0.0) - seconds
        self.add(target, seconds)


def from_metrics(metrics: dict) -> dict[str, float]:
    """{name: seconds} of the phase keys in a report / MLflow metrics dict."""
    return {k[len(PREFIX):-len(SUFFIX)]: float(v) for k, v in metrics.items() if _is_seconds(k)}


def breakdown(seconds: dict[str, float], wall: float | None = None) -> list[tuple[str, float, float]]:
    """[(phase, seconds, share of `wall`)] in PHASES order, then `other` (wall less the phases,
    when a wall time is given and exceeds them)."""
    total = wall if wall is not None else sum(seconds.values())
    rows = [(n, seconds[n], seconds[n] / total if total else float("nan"))
            for n in PHASES if n in seconds]
    rest = (wall - sum(v for n, v in seconds.items() if n not in OUTSIDE_WALL)) if wall is not None else 0.0
    if rest > 0:
        rows.append(("other", rest, rest / total))
    return rows


def overhead_share(seconds: dict[str, float], wall: float) -> float:
    """The share of `wall` not spent in training steps."""
    return 1.0 - sum(seconds.get(n, 0.0) for n in TRAINING) / wall if wall > 0 else float("nan")


def markdown(seconds: dict[str, float], wall: float | None = None) -> str:
    """The breakdown as a markdown table (benchmarks/RESULTS.md)."""
    lines = ["| phase | s | share |", "| --- | ---: | ---: |"]
    lines += [f"| {n} | {s:.2f} | {f:.0%} |" for n, s, f in breakdown(seconds, wall)]
    if wall is not None:
        lines.append(f"| **wall** | {wall:.2f} | non-training {overhead_share(seconds, wall):.0%} |")
    return "\n".join(lines)


def driver_phases(*, pending_at: float | None, actor_at: float | None, last: dict,
                  received_at: float | None, complete_at: float) -> dict[str, float]:
    """The phases the driver times around the worker's (all wall-clock stamps, time.time()):
    `pending_at` the trial first seen waiting, `actor_at` its actor started, `last` the last
    report's phase keys (with the worker's stamps), received by the driver at `received_at`,
    `complete_at` the trial complete. Returns {name: seconds} over the worker's phases, with
    `wall` (actor start -> complete; scheduling_wait is outside it)."""
    out = from_metrics(last)
    if pending_at is not None and actor_at is not None:
        out["scheduling_wait"] = max(0.0, actor_at - pending_at)
    if actor_at is not None and TRIAL_FN_AT in last:
        out["trial_start"] = max(0.0, float(last[TRIAL_FN_AT]) - actor_at)
    if received_at is not None:
        if SENT_AT in last:  # the last report's delivery, its checkpoint write included
            out["final_checkpoint"] = max(0.0, received_at - float(last[SENT_AT]))
        out["teardown"] = max(0.0, complete_at - received_at)
    if actor_at is not None:
        out["wall"] = complete_at - actor_at
    return out


def summary_metrics(seconds: dict[str, float]) -> dict[str, float]:
    """The MLflow metrics of a finished trial's phases: phase/<name>_s, phase/wall_s and
    phase/non_training_share (of the wall time)."""
    out = {key(n): v for n, v in seconds.items()}
    if seconds.get("wall"):
        phases = {n: v for n, v in seconds.items() if n != "wall"}
        out[f"{PREFIX}non_training_share"] = overhead_share(phases, seconds["wall"])
    return out
