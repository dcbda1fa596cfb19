"""Does the search pay for itself? The paper's fixed recipe against random search and against
regft's default search, at the same trial budget, on the shapes testbed (issue 17 item 3).

    python benchmarks/search_value.py --seeds 0 1 2 --num-samples 12        # ~hours on 2 CPUs
    python benchmarks/search_value.py --seeds 0 --num-samples 2 --epochs 1 --images-per-class 10
    python benchmarks/search_value.py --from-json a.json b.json --plot value.png   # re-print, merged

Per seed, three searches through the real command (`regft.tune.main`, in process, one local Ray),
on `shapes --preset smoke` (plus `--collapse` if given) with the same dataset:

- A, the paper's recipe: lr 1e-3, VC 0.16 with b/a 0.125 (= 0.02 / 0.16), alpha by the knee rule:
  one trial of a search space with every value fixed (what a user gets without searching).
- B, random search, FIFO: N trials (`--sampler random --scheduler fifo`: Optuna's RandomSampler,
  seeded; everything else is the shipped search: the space, the trials, the selection rule).
- C, regft's default: Optuna TPE + ASHA, N trials. (TPE's first `n_startup_trials` = 10 proposals
  are random draws from the same seed: with N <= 10, B and C try the same configurations and
  differ only by the scheduler.)

`--real-val-per-class K` makes every arm select (epoch and alpha, and so the trial) on K labelled
real-domain images per class instead of the generated val split: `--real-val DIR
--selection-metric real_val`, the README's advice for a user who has a few labelled images.

Reported per search: the selected trial (best `select_metric`, the generated-val value at its
chosen alpha, as the search selects) and its real-test accuracy (reported only: never used to
select), the trial-epochs trained, the wall time of the command; for C the trial-epochs it had
spent when it first reached B's best value, and the fraction of B's trial-epochs that saves.
The oracle per seed: the best real-test accuracy of any trial of A, B or C (a ceiling, chosen on
the test split). Then the means over seeds with [min, max].
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from regft.shapes import REAL_TEST_PER_CLASS, REAL_TEST_SEED  # the task's own real test split

ARMS = ("A", "B", "C")
PAPER_RECIPE = {"lr": 1.0e-3, "vc_weight": 0.16, "vc_cov_ratio": 0.125}  # docs/method.md
REAL = "ens_real_test_acc"  # the selected alpha's real-test accuracy of a trial (reported only)


def recipe_space(path: Path) -> str:
    """A search space whose every dimension is one value: the paper's recipe."""
    lines = ["parameters:"] + [
        f"  {k}: {{distribution: choice, values: [{v!r}], why: \"the paper's recipe\"}}"
        for k, v in PAPER_RECIPE.items()]
    lines.append('alpha: {low: 0.0, high: 1.0, step: 0.1, why: "knee rule on generated val"}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def arm_argv(arm: str, seed: int, args, root: Path) -> list[str]:
    argv = ["shapes", "--preset", "smoke", "--seed", str(seed), "--name", f"value-{arm}-{seed}",
            "--storage", str(root / "store"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}"]
    for flag, value in (("--epochs", args.epochs), ("--images-per-class", args.images_per_class),
                        ("--collapse", args.collapse)):
        if value is not None:
            argv += [flag, str(value)]
    if args.real_test_seed is not None:
        argv += ["--real-test", real_split(root, "test", REAL_TEST_PER_CLASS, args.real_test_seed)]
    if args.real_val_per_class:
        argv += ["--real-val", real_split(root, "val", args.real_val_per_class),
                 "--selection-metric", "real_val"]
    if arm == "A":
        return argv + ["--num-samples", "1", "--scheduler", "fifo",
                       "--search-space", recipe_space(root / "recipe.yaml")]
    if arm == "B":
        return argv + ["--num-samples", str(args.num_samples), "--scheduler", "fifo", "--sampler", "random"]
    return argv + ["--num-samples", str(args.num_samples), "--scheduler", "asha", "--sampler", "tpe"]


def real_split(root: Path, split: str, per_class: int, seed: int = REAL_TEST_SEED) -> str:
    """A labelled real-domain split of the testbed, written once as an ImageFolder: `val` (none of
    its images in any test split: what a user with a few labelled images per class has), or
    `test` at another seed than the shipped one (a held-out test split: figures chosen on the
    shipped real test are checked on images they never saw)."""
    from regft.shapes import write_real_test

    folder = root / f"real-{split}-{per_class}-seed{seed}"
    if not folder.exists():
        write_real_test(str(folder.with_suffix(".partial")), per_class, seed, split=split)
        folder.with_suffix(".partial").rename(folder)
    return str(folder)


def run_arm(arm: str, seed: int, args, root: Path) -> dict:
    from regft.tune import main

    argv = arm_argv(arm, seed, args, root)
    t0 = time.time()
    rc = main(argv)
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"arm {arm} seed {seed} failed (exit {rc}): "
                         f"python -m regft.tune {' '.join(argv)}")
    return {"arm": arm, "seed": seed, "wall_s": wall,
            **trial_rows(str(root / "store" / "searches" / f"value-{arm}-{seed}"))}


def trial_rows(experiment_path: str) -> dict:
    """Per trial: its epoch reports and its final report, from Tune's progress files."""
    from ray.tune import ExperimentAnalysis

    events, finals, starts = [], [], []  # (timestamp, final?) of every report; finals' numbers
    analysis = ExperimentAnalysis(experiment_path)
    configs = analysis.get_all_configs()  # keyed by trial path, as trial_dataframes
    for path, df in analysis.trial_dataframes.items():
        if df.empty:
            continue
        config = {k: v for k, v in configs.get(path, {}).items() if isinstance(v, (int, float, str))}
        starts.append(float(df["timestamp"].iloc[0] - df["time_this_iter_s"].iloc[0]))
        is_final = df["final"].fillna(False).astype(bool) if "final" in df else df["epoch"] * 0 > 0
        for ts, final in zip(df["timestamp"], is_final):
            events.append((float(ts), bool(final)))
        for _, row in df[is_final].iterrows():
            finals.append({"select": float(row["select_metric"]), "real": float(row[REAL]),
                           "timestamp": float(row["timestamp"]), "config": config,
                           "alpha": float(row["best_alpha"]), "ft_real": float(row["ft_real_test_acc"]),
                           "zs_real": float(row["zs_real_test_acc"])})
    events.sort()
    # the search itself: first trial start to last report (A's command also generates the data)
    search_s = events[-1][0] - min(starts) if events else float("nan")
    return {"trials": len(finals), "trial_epochs": sum(1 for _, f in events if not f),
            "search_s": search_s, "events": events, "finals": finals}


def selected(r: dict) -> dict:
    """The search's choice: the best select_metric (ties to the earlier trial)."""
    return max(sorted(r["finals"], key=lambda f: f["timestamp"]), key=lambda f: f["select"])


def epochs_to_reach(r: dict, target: float) -> int | None:
    """Trial-epochs spent (in time order) when a final report first reached `target`."""
    spent = 0
    reached = {f["timestamp"] for f in r["finals"] if f["select"] >= target}
    for ts, final in r["events"]:
        if final and ts in reached:
            return spent
        spent += 0 if final else 1
    return None


def summarize(rows: list[dict]) -> list[str]:
    by = {(r["arm"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    lines = ["| seed | arm | trials | trial-epochs | selected: select | real test | search s | command s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    stats: dict[str, list[float]] = {}
    for seed in seeds:
        arms = [arm for arm in ARMS if (arm, seed) in by]
        for arm in arms:
            r = by[(arm, seed)]
            s = selected(r)
            lines.append(f"| {seed} | {arm} | {r['trials']} | {r['trial_epochs']} | {s['select']:.4f} "
                         f"| {s['real']:.4f} | {r['search_s']:.0f} | {r['wall_s']:.0f} |")
            stats.setdefault(f"{arm} real", []).append(s["real"])
            stats.setdefault(f"{arm} trial-epochs", []).append(r["trial_epochs"])
        oracle = max(f["real"] for arm in arms for f in by[(arm, seed)]["finals"])
        stats.setdefault("oracle real", []).append(oracle)
        lines.append(f"| {seed} | oracle | | | | {oracle:.4f} | | |")
        if {"A", "C"} <= set(arms):
            stats.setdefault("C - A real", []).append(
                selected(by[("C", seed)])["real"] - selected(by[("A", seed)])["real"])
        if {"B", "C"} <= set(arms):
            b, c = by[("B", seed)], by[("C", seed)]
            reach = epochs_to_reach(c, selected(b)["select"])
            saved = None if reach is None else 1 - reach / b["trial_epochs"]
            lines.append(f"| {seed} | C vs B | | C reached B's best after {reach} trial-epochs | "
                         f"saved {'-' if saved is None else f'{saved:.0%}'} of B's | | | |")
            if saved is not None:
                stats.setdefault("C saved vs B", []).append(saved)
    lines.append("")
    for k, v in stats.items():
        lines.append(f"{k}: mean {statistics.mean(v):.4f} [{min(v):.4f}, {max(v):.4f}] over {len(v)} seeds")
    return lines


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rank correlation, ties given their mean rank (None where either side is constant
    or too short)."""
    import pandas as pd

    rx, ry = pd.Series(x).rank().tolist(), pd.Series(y).rank().tolist()
    if len(x) < 3 or len(set(rx)) < 2 or len(set(ry)) < 2:
        return None
    return statistics.correlation(rx, ry)


def trial_lines(rows: list[dict]) -> list[str]:
    """Every finished trial, in the order it finished: the values it was given, the alpha it
    chose, its selection value and real-test numbers; then, per search, how the selection value
    ranks its trials against how real test does."""
    lines = ["| seed | arm | lr | vc_weight | alpha | select | ft real | ens real |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for f in sorted(r["finals"], key=lambda f: f["timestamp"]):
            c = f.get("config", {})
            lines.append(f"| {r['seed']} | {r['arm']} | {c.get('lr', float('nan')):.2e} "
                         f"| {c.get('vc_weight', float('nan')):.3f} | {f.get('alpha', float('nan')):.1f} "
                         f"| {f['select']:.4f} | {f.get('ft_real', float('nan')):.4f} | {f['real']:.4f} |")
    lines.append("")
    for r in rows:
        if r["arm"] != "A":
            rho = spearman([f["select"] for f in r["finals"]], [f["real"] for f in r["finals"]])
            lines.append(f"seed {r['seed']} {r['arm']}: Spearman(select, real test) over its "
                         f"{len(r['finals'])} finished trials: {'-' if rho is None else f'{rho:+.2f}'}")
    return lines


def expected_selected_real(finals: list[dict], n: int) -> float:
    """The real test of the trial a search of `n` of these trials would select (best select, ties
    to the earlier trial), averaged exactly over every n-subset: a trial is selected by the subsets
    that hold it and n - 1 of the trials it beats, C(beaten, n - 1) of the C(len, n)."""
    order = sorted(finals, key=lambda f: (f["select"], -f["timestamp"]))  # worst first
    weighted = sum(math.comb(beaten, n - 1) * f["real"] for beaten, f in enumerate(order))
    return weighted / math.comb(len(order), n)


def trial_count_lines(rows: list[dict]) -> list[str]:
    """How much a random search gains from more trials: for n = 1 .. N, the expected real test of
    the selected trial of a random search of n trials, drawn from B's (random) trials of a seed."""
    b = sorted((r for r in rows if r["arm"] == "B"), key=lambda r: r["seed"])
    if not b:
        return []
    width = max(len(r["finals"]) for r in b)
    lines = ["| seed | " + " | ".join(f"n={n}" for n in range(1, width + 1)) + " |",
             "| --- |" + " --- |" * width]
    for r in b:
        lines.append(f"| {r['seed']} | " + " | ".join(
            f"{expected_selected_real(r['finals'], n):.4f}" for n in range(1, len(r["finals"]) + 1)) + " |")
    return ["Expected real test of the selected trial of a random search of n trials (exact mean over "
            "every n-subset of B's trials):"] + lines


def plot(rows: list[dict], path: str) -> None:
    """Each finished trial, one column per seed: its real test against its selection value (does
    what the search selects on track what a user wants?) and against its lr (where in the range
    the good trials are)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted({r["seed"] for r in rows})
    fig, axes = plt.subplots(2, len(seeds), figsize=(4.2 * len(seeds), 7.4), squeeze=False)
    style = {"A": ("*", "the recipe (A)", 160), "B": ("o", "random + FIFO (B)", 36),
             "C": ("x", "TPE + ASHA (C)", 44)}
    for col, seed in enumerate(seeds):
        for r in (r for r in rows if r["seed"] == seed):
            marker, label, size = style[r["arm"]]
            real = [f["real"] for f in r["finals"]]
            axes[0][col].scatter([f["select"] for f in r["finals"]], real, marker=marker, s=size, label=label)
            axes[1][col].scatter([f.get("config", {}).get("lr", math.nan) for f in r["finals"]], real,
                                 marker=marker, s=size, label=label)
        axes[0][col].set_title(f"seed {seed}")
        axes[0][col].set_xlabel("selection value (select_metric at the chosen alpha)")
        axes[1][col].set_xlabel("lr")
        axes[1][col].set_xscale("log")
        for ax in axes[:, col]:
            ax.set_ylabel("real test (reported only)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num-samples", type=int, default=12, help="trials of B and of C (N)")
    p.add_argument("--arms", default="ABC", help="which arms to run (default ABC; A runs first "
                   "whenever it is given: it generates the seed's dataset)")
    p.add_argument("--epochs", type=int, default=None, help="default: the preset's (13)")
    p.add_argument("--images-per-class", type=int, default=None, help="default: the preset's (100)")
    p.add_argument("--collapse", type=float, default=None, help="shapes diversity collapse")
    p.add_argument("--real-val-per-class", type=int, default=None, metavar="K",
                   help="select on K labelled real images per class (--real-val, --selection-metric "
                        "real_val) instead of the generated val split, in every arm")
    p.add_argument("--real-test-seed", type=int, default=None, metavar="S",
                   help="report real test on a held-out split rendered at seed S (default: the task's own, "
                        f"seed {REAL_TEST_SEED})")
    p.add_argument("--json", default=None, help="write every arm's numbers to this file")
    p.add_argument("--root", default=None,
                   help="keep the store and the MLflow db in this folder (default: a temporary one)")
    p.add_argument("--from-json", nargs="+", default=None, metavar="FILE",
                   help="run nothing: print the summary of runs saved with --json (several merge)")
    p.add_argument("--plot", default=None, metavar="PNG", help="also draw select vs real test per trial")
    args = p.parse_args(argv)
    if not args.arms or set(args.arms) - set(ARMS):
        p.error(f"--arms: letters of {''.join(ARMS)}, got {args.arms!r}")
    if args.real_val_per_class is not None and args.real_val_per_class <= 0:
        p.error(f"--real-val-per-class: a positive number of images per class, got {args.real_val_per_class}")
    given = argv if argv is not None else sys.argv[1:]
    if args.from_json:
        try:
            rows = [row for f in args.from_json for row in json.loads(Path(f).read_text(encoding="utf-8"))]
        except (OSError, ValueError) as e:
            p.error(f"--from-json: {str(e)[:200]}")
        return report(rows, args, given)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:  # A first: it also generates the seed's dataset, B and C reuse it
            rows += [run_arm(arm, seed, args, root) for arm in ARMS if arm in args.arms]
    if args.json:
        Path(args.json).write_text(json.dumps(rows), encoding="utf-8")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
          f"load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    return report(rows, args, given)


def report(rows: list[dict], args, given: list[str]) -> int:
    print(f"command: python benchmarks/search_value.py {' '.join(given)}")
    print("\n".join(summarize(rows)))
    print("\n".join(trial_lines(rows)))
    print("\n".join(trial_count_lines(rows)))
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
