"""A console a person can read, and a full log of everything (issue 15). Stdlib only.

`session()` tees what this process writes to file descriptors 1 and 2 (so C++ log lines of
Ray's core worker and the output of child processes are caught too, not only Python's
`sys.stdout`) into a log file, and passes to the real terminal only what a person needs:

    with console.session(verbose=args.verbose) as con:   # starts on a temporary log file
        ...                                               # the state folder is chosen here
        con.log_to(Path(experiment_path) / "search.log")  # moved there, nothing lost

By default the terminal gets every line except
  - the known-harmless messages of `HIDDEN` (an explicit list, each entry says why), and
    progress-bar fragments drawn inside Ray workers (Ray Data's per-operator bars);
  - cursor-up/down sequences (they only come from multi-bar displays, whose lines are dropped,
    and would move the cursor over lines that were kept) and, when the terminal is not a TTY,
    every other escape sequence and carriage-return redraw: a progress bar becomes a few plain
    lines (0, 25, 50, 75, 100 %) instead of hundreds of overwritten states.
Nothing is de-duplicated or rewritten by guesswork. `verbose=True` passes everything through
unchanged; the log file always holds the full, unfiltered bytes.

The Ray side (one line per epoch per trial from the driver, Tune's status table at a modest
interval, the settings that keep worker output out of the driver) is in regft.console_ray.
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import os
import re
import select
import shutil
import sys
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from regft.cli import RedactingTextIO

# A partial line (no newline yet) is shown after this long without more output: a prompt, or a
# line a program writes in pieces, must not wait for a newline that may never come.
PARTIAL_LINE_WAIT_S = 0.3
READ_CHUNK = 65536
# How long stop() waits for the reader threads to drain the pipes after the descriptors are
# restored (a child process still holding the pipe keeps them reading, in the background).
DRAIN_WAIT_S = 2.0
# A progress bar on a non-TTY is shown when it crosses each quarter (0, 25, 50, 75, 100 %).
BAR_STEP_PERCENT = 25

# --------------------------------------------------------------------- what is hidden --
# Known-harmless messages, hidden from the terminal (they stay in the log file). Each pattern
# is searched in the line with escape sequences removed; keep every entry specific to one
# message, with the reason it is harmless.
HIDDEN: tuple[tuple[re.Pattern, str], ...] = tuple((re.compile(p), why) for p, why in (
    (r"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object "
     r"store and max_restarts > 0",
     "Ray core (C++) says this for every restartable actor built from object-store arguments "
     "(Ray Data's map actors, Train's PreemptionWatcher); informational, ray#53727"),
    (r"You have specified `max_concurrent_trials=\d+`, but the `search_alg` is already a "
     r"`ConcurrencyLimiter`",
     "Tune: the search passes both on purpose (the limiter bounds Optuna, the flag Tune)"),
    (r"Checkpoint successfully created at: Checkpoint\(",
     "Ray Train, once per reported epoch; the epoch line says the same"),
    (r"Reporting training result \d+: TrainingReport\(",
     "Ray Train, once per reported epoch; the epoch line says the same"),
    (r"To visualize your results with TensorBoard, run:",
     "Tune's TensorBoard hint; the event files are in Tune's folder, named in the log"),
    (r"(The `[\w.]+` operation took|Processing trial results took) [\d.]+ s, which may be a "
     r"performance bottleneck",
     "Tune's slow-callback timer (TUNE_WARN_THRESHOLD_S, 0.5 s): the MLflow callback logging "
     "a trial's final curves on a small machine trips it"),
    (r"streaming_executor\.py:\d+ -- (Starting execution of Dataset|Execution plan of Dataset"
     r"|✔️\s+Dataset \S+ execution finished)",
     "Ray Data, per dataset execution; also in the session's logs/ray-data folder"),
    (r"(Starting execution of Dataset|Execution plan of Dataset) \S+[:.]",
     "the same Ray Data lines, as streamed from a worker"),
    (r"✔️\s+Dataset \S+ execution finished in [\d.]+ seconds",
     "the same Ray Data lines, as streamed from a worker"),
    (r"Progress bars disabled\. To enable, set `ray\.data\.DataContext",
     "regft.generate turns Ray Data's bars off on purpose: it draws its own"),
    (r"\[dataset\]: A new progress UI is available",
     "Ray Data's hint about its rich progress bars"),
    (r"Truncating long operator name to \d+ characters",
     "Ray Data, about its own progress-bar labels"),
    (r"Detected that the Ray Train controller actor \(\w+\) is dead\. Cleaning up placement group",
     "Ray Train's placement-group cleaner after every finished run"),
    (r"INFO tune\.py:\d+ -- Wrote the latest version of all result files and experiment state",
     "Tune's INFO when the search ends; the summary names the search's folder"),
    (r"INFO mlflow\.store\.db\.utils: (Creating initial MLflow database tables|Updating database "
     r"tables)",
     "MLflow creating its SQLite tables on first use"),
    (r"^\[I [\d-]+ [\d:,.]+\] A new study created in RDB with name:",
     "Optuna's INFO when the search creates its study (the search header names it)"),
))

_CSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")  # any escape sequence: colours, cursor moves
_CURSOR_UP_DOWN = re.compile(rb"\x1b\[\d*[AB]")
# the prefix Ray puts on a line streamed from a worker: "(pid=5119) ", "(trial_fn pid=5119) ",
# "(RayTrainWorker pid=6526, ip=10.0.0.2) "
_WORKER = re.compile(r"^\((?:[\w.]+ )?pid=\d+(?:, ip=[\d.]+)?\) ")
# a tqdm-style bar: "42%|" or an elapsed/rate field "[00:01<?, ? row/s]", "[00:08, 170 row/s]"
_BAR = re.compile(r"\d+%\||\[\d\d:\d\d(?::\d\d)?(?:<[^\]]*)?, [^\]]*/s\]")
_PERCENT = re.compile(r"(\d+)%\|")


WORKER_BAR = "a progress bar drawn inside a Ray worker (Ray Data's per-operator bars)"


def plain(data: bytes) -> str:
    """The text of `data` with escape sequences removed (bytes kept as surrogates)."""
    return _CSI.sub(b"", data).decode("utf-8", "surrogateescape")


def hidden_reason(text: str) -> str | None:
    """Why a line (escape sequences removed) is not shown; None: it is shown."""
    if _WORKER.match(text) and _BAR.search(text):
        return WORKER_BAR
    for pattern, why in HIDDEN:
        if pattern.search(text):
            return why
    return None


def _bar_step(text: str) -> int | None:
    """Which quarter a progress-bar state is in (0 for a bar without a percentage); None: not
    a bar."""
    if not _BAR.search(text):
        return None
    m = _PERCENT.search(text)
    return int(m.group(1)) // BAR_STEP_PERCENT if m else 0


def _from_worker(data: bytes) -> bool:
    """Whether a partial line is (or may yet be) one Ray streams from a worker."""
    if _split_unfinished_escape(data)[1]:
        return True  # a read ended inside an escape sequence: undecided yet
    for segment in data.split(b"\r"):
        text = plain(segment).lstrip()
        if _WORKER.match(text) or (text.startswith("(") and ")" not in text):
            return True
    return False


def _split_unfinished_escape(data: bytes) -> tuple[bytes, bytes]:
    """`data` less an escape sequence cut off at its end (a read can end inside one), and that
    unfinished rest, to be completed by the next read."""
    esc = data.rfind(b"\x1b")
    if esc < 0 or _CSI.match(data, esc):
        return data, b""
    return data[:esc], data[esc:]


# -------------------------------------------------------------------------- the filter --
@dataclass
class LineFilter:
    """What of one stream reaches the terminal. `feed(bytes)` returns the bytes to show now;
    `pending(idle_s)` those of a partial line waited on long enough; `close()` the rest.

    tty: the terminal is a TTY (carriage-return redraws pass, so a bar draws in place; escape
    sequences other than cursor up/down pass). verbose: everything passes unchanged."""

    tty: bool
    verbose: bool = False
    _buf: bytes = b""
    _shown_part: bool = False  # part of the current line was already shown (no filtering now)
    _bar_step: int = -1  # the last quarter shown of the current line's bar (non-TTY)
    # Right after a hidden bar fragment: the empty lines that follow are part of its drawing
    # (a multi-bar display moves down with newlines and back up with cursor-up sequences).
    _in_bar: bool = False

    def feed(self, data: bytes) -> bytes:
        if self.verbose:
            return data
        self._buf += data
        out = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            out.append(self._line(line))
        if b"\r" in self._buf:  # a redraw in progress
            out.append(self._redraws())
        return b"".join(out)

    def pending(self) -> bytes:
        """The partial line, shown as it is (called after PARTIAL_LINE_WAIT_S without output)."""
        if self.verbose or not self._buf or (b"\r" in self._buf and (
                not self.tty or _from_worker(self._buf))):
            return b""  # a bar's latest state waits for the next one (non-TTY), or its line
        data, self._buf, self._shown_part = self._buf, b"", True
        return self._show_raw(data)

    def close(self) -> bytes:
        """The last line, which had no newline (none is added)."""
        if self.verbose or not self._buf:
            return b""
        line, self._buf = self._buf, b""
        out = self._line(line)
        return out[:-1] if out.endswith(b"\n") else out

    # -- one complete line (without its newline)
    def _line(self, line: bytes) -> bytes:
        shown_part, self._shown_part = self._shown_part, False
        if shown_part:  # its start is on the screen already: the rest goes with it
            return self._finish_bar(line) if not self.tty else self._show_raw(line) + b"\n"
        segments = line.split(b"\r")
        texts = [plain(s) for s in segments]
        reasons = [r for r in map(hidden_reason, texts) if r]
        redrawn = len(segments) > 1 or bool(_CURSOR_UP_DOWN.search(line))
        if reasons:
            self._bar_step = -1
            self._in_bar = redrawn or any(r == WORKER_BAR for r in reasons)
            return b""
        if not "".join(texts).strip() and (redrawn or self._in_bar):
            return b""  # what is left of a cleared or hidden bar: blanks and cursor moves
        self._in_bar = False
        if self.tty:
            return self._show_raw(line) + b"\n"
        return self._finish_bar(line)

    def _finish_bar(self, line: bytes) -> bytes:
        """Non-TTY: a line's carriage-return states as plain lines, the bar's quarters only."""
        *states, last_state = line.split(b"\r")
        if not states:  # an ordinary line (empty ones too)
            self._bar_step = -1
            return _CSI.sub(b"", line) + b"\n"
        out = [self._state(s) for s in states]
        last = plain(last_state)
        step = _bar_step(last)
        if last.strip() and (step is None or step > self._bar_step):
            out.append(last.encode("utf-8", "surrogateescape") + b"\n")
        self._bar_step = -1
        return b"".join(out)

    def _state(self, segment: bytes) -> bytes:
        """Non-TTY: one overwritten state of a line (a bar's, usually)."""
        text = plain(segment)
        step = _bar_step(text)
        if not text.strip() or hidden_reason(text) or (step is not None and step <= self._bar_step):
            return b""
        if step is not None:
            self._bar_step = step
        return text.encode("utf-8", "surrogateescape") + b"\n"

    # -- a partial line holding carriage returns: a bar being drawn
    def _redraws(self) -> bytes:
        head, _, tail = self._buf.rpartition(b"\r")
        if self.tty and _from_worker(self._buf):
            return b""  # streamed from a worker: Ray sends whole lines, judged when complete
        if self.tty:  # draw it now; the state after the last \r is drawn with it
            data, self._buf = _split_unfinished_escape(self._buf)
            if any(hidden_reason(plain(s)) for s in data.split(b"\r")):
                return b""
            self._shown_part = True
            return self._show_raw(data)
        self._buf = b"\r" + tail
        return b"".join(self._state(s) for s in head.split(b"\r"))

    def _show_raw(self, data: bytes) -> bytes:
        if self.tty:
            return _CURSOR_UP_DOWN.sub(b"", data)
        return _CSI.sub(b"", data)


# ------------------------------------------------------------------------------ the log --
class Log:
    """The full log: every byte of both streams, in arrival order. Starts on a temporary file
    and can be moved to its final place while being written (`move_to`)."""

    def __init__(self, path: Path | None = None):
        if path is None:
            fd, name = tempfile.mkstemp(prefix="regft-", suffix=".log")
            os.close(fd)
            path = Path(name)
            self.temporary = True
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.temporary = False
        self.path = path
        self._file = open(path, "ab")
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._file is not None:
                self._file.write(data)
                self._file.flush()

    def move_to(self, path: Path) -> None:
        """Continue the log at `path`: what was written so far is moved there (appended, if the
        file exists: a resumed search continues its log), then new output goes there."""
        path = Path(path)
        with self._lock:
            self._file.close()
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.resolve() != self.path.resolve():
                if path.exists():
                    with open(self.path, "rb") as src, open(path, "ab") as dst:
                        shutil.copyfileobj(src, dst)
                    self.path.unlink()
                else:
                    shutil.move(str(self.path), str(path))
            self.path, self.temporary = path, False
            self._file = open(path, "ab")

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ------------------------------------------------------------------------------ the tee --
@dataclass
class _Tee:
    """One descriptor (1 or 2) redirected into a pipe; a thread copies the pipe into the log
    and, filtered, to where the stream went before: the saved real descriptor or, when Python's
    stream had been redirected (a test's `redirect_stdout`, pytest's capture), that object."""

    fd: int
    log: Log
    verbose: bool
    redirected: Any = None  # the Python stream to show to instead of the descriptor
    real: int = -1
    _read: int = -1
    _thread: threading.Thread | None = None
    filter: LineFilter = field(init=False)

    def start(self) -> None:
        self.real = os.dup(self.fd)
        self.filter = LineFilter(tty=self._isatty(), verbose=self.verbose)
        self._read, write = os.pipe()
        os.dup2(write, self.fd)
        os.close(write)
        self._thread = threading.Thread(target=self._copy, name=f"console-fd{self.fd}", daemon=True)
        self._thread.start()

    def _isatty(self) -> bool:
        if self.redirected is None:
            return os.isatty(self.real)
        with contextlib.suppress(Exception):
            return bool(self.redirected.isatty())
        return False

    def _copy(self) -> None:
        while True:
            ready, _, _ = select.select([self._read], [], [], PARTIAL_LINE_WAIT_S)
            if not ready:
                self._show(self.filter.pending())
                continue
            data = os.read(self._read, READ_CHUNK)
            if not data:  # every writer closed the pipe
                break
            self.log.write(data)
            self._show(self.filter.feed(data))
        self._show(self.filter.close())
        os.close(self._read)

    def _show(self, data: bytes) -> None:
        if data and self.redirected is not None:
            with contextlib.suppress(Exception):  # a closed capture: the log still has it all
                self.redirected.write(data.decode("utf-8", "replace"))
                self.redirected.flush()
            return
        while data:
            try:
                data = data[os.write(self.real, data):]
            except InterruptedError:
                continue
            except OSError:  # the terminal went away (closed pipe): the log still has it all
                return

    def stop(self) -> bool:
        """Give the descriptor back; True when the copy finished (else it goes on in the
        background while a child process still holds the pipe)."""
        os.dup2(self.real, self.fd)
        self._thread.join(DRAIN_WAIT_S)
        done = not self._thread.is_alive()
        if done:
            os.close(self.real)
        return done


def _flush_c_stdio() -> None:
    """fflush(NULL): what C code buffered in stdio reaches the descriptors before they move."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).fflush(None)


class Console:
    """See the module docstring. Use `session()`; `log_to(path)` moves the log."""

    def __init__(self, log_path: Path | None = None, verbose: bool = False, announce: bool = True):
        self.verbose = verbose
        self.announce = announce
        self.log = Log(Path(log_path) if log_path else None)
        self._tees: list[_Tee] = []
        self._streams: tuple | None = None
        self.notes: list[str] = []  # printed after the log's path at the end (e.g. Ray's logs)

    @property
    def log_path(self) -> Path:
        return self.log.path

    def log_to(self, path: Path | str) -> Path:
        """Continue the log at `path` (e.g. search.log next to the search's state)."""
        self._flush_python()
        self.log.move_to(Path(path))
        return self.log.path

    def start(self) -> Console:
        self._flush_python()
        _flush_c_stdio()
        self._streams = (sys.stdout, sys.stderr)
        originals = (sys.__stdout__, sys.__stderr__)
        self._tees = [_Tee(fd, self.log, self.verbose, None if old is orig else old)
                      for fd, old, orig in zip((1, 2), self._streams, originals)]
        for tee in self._tees:
            tee.start()
        # Python's own streams now write to the descriptors, line by line, so the log keeps the
        # order of events (Python, C++ and child processes alike)
        sys.stdout, sys.stderr = (self._text_stream(fd, old) for fd, old in zip((1, 2), self._streams))
        return self

    @staticmethod
    def _text_stream(fd: int, old) -> io.TextIOWrapper:
        encoding = getattr(old, "encoding", None) or "utf-8"
        # what Python prints is redacted (a store URI's secret); line-buffered as open(..., 1)
        return RedactingTextIO(open(fd, "wb", closefd=False), encoding=encoding,
                               errors="backslashreplace", line_buffering=True)

    def _flush_python(self) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    def stop(self, exc: BaseException | None = None) -> None:
        """Flush, give the descriptors and Python's streams back, close the log. An exception
        that ends the session is written to the log (the terminal gets it from Python)."""
        if self._streams is None:
            return
        if exc is not None and not isinstance(exc, SystemExit):
            self.log.write("".join(traceback.format_exception(exc)).encode("utf-8", "replace"))
        if exc is not None:
            # the error's own message (entry_point's, argparse's usage line, the traceback) or
            # --help's text is what the user needs to read last; the log has it too
            self.announce = False
        self._flush_python()
        _flush_c_stdio()
        sys.stdout, sys.stderr = self._streams
        self._streams = None
        finished = [tee.stop() for tee in self._tees]
        closing = "\n".join([f"full log: {self.log.path}", *self.notes]) + "\n"
        if self.announce:  # the log gets the closing lines too: it holds all that was shown
            self.log.write(closing.encode("utf-8", "replace"))
        if all(finished):
            self.log.close()
        if self.announce:
            sys.stderr.write(closing)
            sys.stderr.flush()


_active: list[Console] = []  # the running session, so deep code can move its log


def active() -> Console | None:
    """The running session (None outside one)."""
    return _active[-1] if _active else None


def log_to(path: Path | str) -> Path | None:
    """Move the running session's log to `path` (see Console.log_to); None outside a session."""
    con = active()
    return con.log_to(path) if con else None


def add_note(line: str) -> None:
    """A line for the end of the running session, after the log's path (no-op outside one)."""
    con = active()
    if con is not None and line not in con.notes:
        con.notes.append(line)


@contextlib.contextmanager
def session(log_path: Path | str | None = None, *, verbose: bool = False,
            announce: bool = True) -> Iterator[Console]:
    """Tee both output descriptors into a log file and filter what the terminal shows (see the
    module docstring) for the duration of the block; descriptors and streams are restored on any
    exit (exceptions and KeyboardInterrupt included). `log_path` None: a temporary file until
    `log_to(path)`. `announce`: print where the full log is at the end."""
    con = Console(log_path, verbose=verbose, announce=announce).start()
    _active.append(con)
    try:
        yield con
    except BaseException as e:
        _active.remove(con)
        con.stop(e)
        raise
    _active.remove(con)
    con.stop()
