"""regft.console (issue 15): the terminal shows what a person needs, the log file keeps it all.

Fast, no Ray: the filter on lines copied from a real smoke search's output (before the console
existed), the descriptor-level tee with a child process writing to fd 2, the log moving from its
temporary file to its final place, --verbose passing everything, descriptors given back.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from regft import console
from regft.console import LineFilter, hidden_reason

ESC = "\x1b"
# Excerpt of `python -m regft.tune shapes --preset smoke --seed 0` (2026-12-01, before issue 15),
# byte for byte: Ray Data's bars drawn inside a trial (carriage returns, cursor-up sequences, the
# blank lines of the multi-bar drawing), Ray's own messages, and the lines a person needs.
WORKER_BARS = (
    f"\r{ESC}[2m{ESC}[36m(pid=5119) {ESC}[0mRunning Dataset dataset_0357A95YLUxP3MFKWrHIzZ_0.: "
    "0.00 row [00:00, ? row/s]\n"
    f"\r{ESC}[2m{ESC}[36m(pid=5119) {ESC}[0m- ListFiles:   0%|          | 0.00/1.00 "
    f"[00:00<?, ? row/s]{ESC}[A\n"
    "\n"
    f"\r{ESC}[2m{ESC}[36m(pid=5119) {ESC}[0m- ReadFilesParquetV2->MapBatches(_filter_split)->"
    f"Project:   0%|          | 0.00/1.00 [00:00<?, ? row/s]{ESC}[A{ESC}[A\r"
    "                                                                                       \r\n"
    f"\r                                                                     \r{ESC}[A\n"
    "\n"
    f"\r{ESC}[2m{ESC}[36m(pid=6950) {ESC}[0m  *- Shuffle Map: 100%|██████████| 1.45k/1.45k "
    f"[00:02<00:00, 705 row/s]{ESC}[A\n"
)
RAY_NOISE = (
    "[2026-12-01 13:47:08,487 E 3803 3803] core_worker.cc:2465: Actor with class name: "
    "'MapWorker(MapBatches(ShardWorker))' and ID: 'c2d21fcc29afa4cb2b6bb42b01000000' has "
    "constructor arguments in the object store and max_restarts > 0. If the arguments in the "
    "object store go out of scope or are lost, the actor restart will fail. See "
    "https://github.com/ray-project/ray/issues/53727 for more details.\n"
    "2026-12-01 13:47:19,181\tWARNING tune.py:802 -- You have specified `max_concurrent_trials=1`,"
    " but the `search_alg` is already a `ConcurrencyLimiter`. `max_concurrent_trials` will be "
    "ignored.\n"
    f"{ESC}[36m(RayTrainWorker pid=6526){ESC}[0m Checkpoint successfully created at: "
    "Checkpoint(filesystem=local, path=/tmp/base/regft_runs/train/shapes-smoke-20261201-134704-"
    "75e447d1/checkpoint_2026-12-01_13-48-29.255188)\n"
    f"{ESC}[36m(RayTrainWorker pid=6526){ESC}[0m Reporting training result 1: TrainingReport("
    "checkpoint=Checkpoint(filesystem=local, path=/tmp/base/regft_runs/train/shapes-smoke-"
    "20261201-134704-75e447d1/checkpoint_2026-12-01_13-48-29.255188), metrics={'epoch': 1})\n"
    "To visualize your results with TensorBoard, run: `tensorboard --logdir /tmp/ray/session_"
    "2026-12-01_13-46-56_853877_3803/artifacts/2026-12-01_13-47-19/shapes-smoke/driver_artifacts`\n"
    "2026-12-01 13:49:47,111\tWARNING util.py:212 -- Processing trial results took 0.768 s, "
    "which may be a performance bottleneck. Please consider reporting results less frequently "
    "to Ray Tune.\n"
    "The `callbacks.on_trial_result` operation took 1.054 s, which may be a performance "
    "bottleneck.\n"  # the same, where Ray's logging is not configured (the tests' Ray)
    "2026-12-01 13:47:08,489\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.\n"
)
NEEDED = (
    "dataset: /tmp/base/regft_runs/datasets/shapes-4c40ec2cbb18b9ce (ready in 11 s)\n"
    "search shapes-smoke-20261201-134704: 2 trials, up to 1 at a time, scheduler asha; MLflow "
    "experiment 'regft-shapes' at sqlite:////tmp/base/mlflow.db\n"
    "Trial status: 1 RUNNING\n"
    "\n"
    "  split            zero-shot  fine-tuned  ensemble\n"
    "  real_test           0.8063      0.7837    0.8481\n"
)
# the driver's generation bar, as tqdm draws it on a pipe (one redraw per update)
GENERATION_BAR = "".join(
    f"\rgenerating 25 shard(s) on 1 actor(s): {p:3d}%|{'█' * (p // 10):<10}| {16 * p}/1600 "
    f"[00:{p // 10:02d}<00:00, 99.9img/s]" for p in range(0, 101, 4)) + "\n"


def run_filter(text: str, *, tty: bool, verbose: bool = False, chunk: int | None = 97) -> str:
    """What the terminal gets for `text`, fed in small chunks (reads end anywhere), or line by
    line (chunk None: how Ray's log monitor writes what it streams from workers)."""
    f = LineFilter(tty=tty, verbose=verbose)
    data = text.encode()
    pieces = ([line + b"\n" for line in data.split(b"\n")[:-1]] if chunk is None
              else [data[i:i + chunk] for i in range(0, len(data), chunk)])
    return (b"".join(f.feed(p) for p in pieces) + f.close()).decode()


@pytest.mark.parametrize("tty,chunk", [(False, 97), (False, None), (True, None)])
def test_ray_noise_and_worker_bars_are_hidden_and_needed_lines_kept(tty, chunk):
    out = run_filter(WORKER_BARS + RAY_NOISE + NEEDED, tty=tty, chunk=chunk)
    assert out == NEEDED  # exactly: nothing else, nothing changed, the blank line kept
    assert f"{ESC}[A" not in out


def test_every_hidden_message_says_why():
    for line in RAY_NOISE.splitlines():
        assert hidden_reason(console.plain(line.encode())), line
    for line in NEEDED.splitlines():
        assert hidden_reason(line) is None, line


def test_generation_bar_is_a_few_plain_lines_when_not_a_tty():
    out = run_filter(GENERATION_BAR + "dataset: /x (ready in 11 s)\n", tty=False)
    lines = out.splitlines()
    assert [line.split(":")[1].split("%")[0].strip() for line in lines[:-1]] == \
        ["0", "28", "52", "76", "100"]  # the first state of each quarter
    assert lines[-1] == "dataset: /x (ready in 11 s)"
    assert "\r" not in out and ESC not in out


def test_generation_bar_redraws_in_place_on_a_tty():
    out = run_filter(GENERATION_BAR, tty=True, chunk=10_000)
    assert out == GENERATION_BAR  # one bar, drawn by its carriage returns


def test_verbose_passes_everything_unchanged():
    text = WORKER_BARS + RAY_NOISE + GENERATION_BAR + NEEDED
    for tty in (False, True):
        assert run_filter(text, tty=tty, verbose=True) == text


def test_colours_pass_on_a_tty_and_are_removed_otherwise():
    line = f"{ESC}[1m{ESC}[32mhttp://127.0.0.1:8265 {ESC}[39m{ESC}[22m\n"
    assert run_filter(line, tty=True) == line
    assert run_filter(line, tty=False) == "http://127.0.0.1:8265 \n"


# ------------------------------------------------------------------ descriptors, log --
CHILD = ("import os, sys; os.write(2, b'child on fd 2\\n'); "
         "os.write(2, b'[2026-12-01 13:47:57,396 E 6042 6099] core_worker.cc:2465: Actor with "
         "class name: x has constructor arguments in the object store and max_restarts > 0.\\n'); "
         "print('child on fd 1', flush=True)")


def test_tee_catches_a_child_process_at_the_descriptor_level(tmp_path, capfd):
    log = tmp_path / "run.log"
    with console.session(log, announce=False):
        print("driver line")
        subprocess.run([sys.executable, "-c", CHILD], check=True)  # inherits fds 1 and 2
        os.write(2, b"driver writes fd 2 itself\n")
    out, err = capfd.readouterr()
    assert out == "driver line\nchild on fd 1\n"
    assert err == "child on fd 2\ndriver writes fd 2 itself\n"  # core_worker line hidden
    full = log.read_text()
    for line in ("driver line", "child on fd 1", "child on fd 2", "core_worker.cc:2465",
                 "driver writes fd 2 itself"):
        assert line in full


def test_log_moves_from_its_temporary_file_to_the_final_one_losing_nothing(tmp_path, capfd):
    final = tmp_path / "search" / "search.log"
    with console.session(announce=False) as con:
        temporary = con.log_path
        for i in range(200):
            print(f"before {i}")
        subprocess.run([sys.executable, "-c", "print('child before', flush=True)"], check=True)
        assert console.log_to(final) == final
        print("after")
    assert not temporary.exists()
    lines = final.read_text().splitlines()
    assert lines == [f"before {i}" for i in range(200)] + ["child before", "after"]
    assert capfd.readouterr().out.splitlines() == lines


def test_a_resumed_log_is_continued(tmp_path, capfd):
    final = tmp_path / "search.log"
    final.write_text("first run\n")
    with console.session(announce=False):
        print("second run")
        console.log_to(final)
    assert final.read_text() == "first run\nsecond run\n"


def test_verbose_session_shows_everything_and_still_logs(tmp_path, capfd):
    log = tmp_path / "run.log"
    with console.session(log, verbose=True, announce=False):
        sys.stderr.write(RAY_NOISE)
    assert capfd.readouterr().err == RAY_NOISE
    assert log.read_text() == RAY_NOISE


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_descriptors_and_streams_are_given_back_after_an_exception(tmp_path, capfd, error):
    before = [os.fstat(fd) for fd in (1, 2)], (sys.stdout, sys.stderr)
    log = tmp_path / "run.log"
    with pytest.raises(error):
        with console.session(log, announce=False):
            print("inside")
            raise error("boom")
    after = [os.fstat(fd) for fd in (1, 2)], (sys.stdout, sys.stderr)
    assert [(s.st_dev, s.st_ino) for s in after[0]] == [(s.st_dev, s.st_ino) for s in before[0]]
    assert after[1][0] is before[1][0] and after[1][1] is before[1][1]
    assert console.active() is None
    print("outside")
    assert capfd.readouterr().out == "inside\noutside\n"
    assert "inside" in log.read_text() and "boom" in log.read_text()  # the traceback is logged


def test_the_end_says_where_the_full_log_is(tmp_path, capfd):
    with console.session(tmp_path / "run.log"):
        print("x")
        console.add_note("workers' output: /tmp/ray/session_x/logs")
    closing = f"full log: {tmp_path / 'run.log'}\nworkers' output: /tmp/ray/session_x/logs\n"
    assert capfd.readouterr().err == closing
    assert (tmp_path / "run.log").read_text() == "x\n" + closing


def test_epoch_and_end_lines():
    from regft.console_ray import end_line, epoch_line  # imports Ray (no cluster)

    epoch = {"epoch": 3, "train_loss": 0.17264, "select_metric": 0.95424, "images_per_s": 347.1}
    assert epoch_line(epoch, 13, "75e447d1") == \
        "trial 75e447d1  epoch  3/13  loss 0.1726  select 0.9542  347 img/s"
    assert epoch_line(epoch, 13) == "epoch  3/13  loss 0.1726  select 0.9542  347 img/s"
    slow = {**epoch, "images_per_s": 0.412}  # a real-size CPU epoch of one step
    assert epoch_line(slow, 1).endswith("select 0.9542  0.41 img/s")
    final = {"final": True, "select_metric": 0.96732, "best_alpha": 0.7, "best_epoch": 13}
    assert end_line("75e447d1", final, 13, "ASHA") == \
        "trial 75e447d1  finished: select 0.9673 (alpha 0.70, best epoch 13/13)"
    assert end_line("7b1c485e", {**epoch, "epoch": 4}, 13, "ASHA") == \
        "trial 7b1c485e  stopped early by ASHA after epoch 4/13 (select 0.9542)"
    diverged = {"diverged": True, "epoch": 2, "train_loss": float("nan"), "select_metric": 0.0}
    assert end_line("x", diverged, 13, "ASHA") == \
        "trial x  diverged at epoch 2/13 (loss nan): stopped, scored 0.0"


def test_an_error_is_the_last_thing_shown(tmp_path, capfd):
    with pytest.raises(RuntimeError):
        with console.session(tmp_path / "run.log"):
            raise RuntimeError("boom")
    assert capfd.readouterr().err == ""  # no "full log:" line after it: the error comes last


@pytest.mark.parametrize("module", ["regft.tune", "regft.plan", "regft.generate", "regft.train"])
@pytest.mark.parametrize("argv", [["--no-such-flag"], ["--help"]])
def test_argparse_exits_end_with_argparse_text_not_a_log_path(module, argv, capfd):
    """A usage error or --help ends with what argparse printed: no "full log:" line after it
    (the log of a command that did nothing is not worth pointing at)."""
    import importlib

    main = importlib.import_module(module).main
    rc = main(["shapes", *argv] if module != "regft.generate" else argv)
    captured = capfd.readouterr()
    assert rc == (0 if argv == ["--help"] else 2)
    assert "full log:" not in captured.err and "full log:" not in captured.out
    assert (captured.out + captured.err).strip(), "argparse printed nothing"


def test_a_failed_trial_line_shows_its_error_and_where_the_traceback_is(tmp_path):
    from regft.console_ray import error_file_line  # imports Ray (no cluster)

    error = tmp_path / "error.txt"
    error.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                     "regft.errors.UserError: ingest worker: use --ingest ray_data\n\n")
    assert error_file_line(str(error)) == "regft.errors.UserError: ingest worker: use --ingest ray_data; "
    error.write_text("RuntimeError: " + "x" * 10_000 + "\n")
    assert len(error_file_line(str(error))) <= 245
    assert error_file_line(str(tmp_path / "missing.txt")) == "" and error_file_line(None) == ""
