"""User errors exit 2 with one line; anything else is a bug and keeps its traceback."""
import subprocess
import sys

import pytest

from regft import errors
from regft.cli import EXIT_USAGE, entry_point
from regft.ensemble import EnsembleError
from regft.export import ExportError
from regft.models import WeightsUnavailable
from regft.store import DatasetNotReady
from regft.tasks import TaskError

USER_FACING = {errors.UserError: ValueError, TaskError: ValueError, EnsembleError: ValueError,
               ExportError: ValueError, DatasetNotReady: ValueError, WeightsUnavailable: RuntimeError}


@pytest.mark.parametrize("cls", list(USER_FACING), ids=lambda c: c.__name__)
def test_user_facing_errors_derive_from_regft_error_and_keep_their_builtin_base(cls):
    assert issubclass(cls, errors.RegftError) and issubclass(cls, USER_FACING[cls])
    assert cls.__module__ == "regft.errors"  # one home, re-exported by the module that raises it


@pytest.mark.parametrize("exc", [errors.UserError("bad --x"), TaskError("bad --x"),
                                 WeightsUnavailable("bad --x"), FileNotFoundError("bad --x"),
                                 PermissionError("bad --x")], ids=lambda e: type(e).__name__)
def test_user_errors_exit_2_with_one_line(exc, capsys):
    def fail(argv):
        raise exc

    assert entry_point(fail)([]) == EXIT_USAGE
    assert capsys.readouterr().err == "error: bad --x\n"


@pytest.mark.parametrize("exc", [ValueError("a bug"), RuntimeError("a bug"), KeyError("a bug")],
                         ids=lambda e: type(e).__name__)
def test_other_exceptions_propagate(exc):
    def fail(argv):
        raise exc

    with pytest.raises(type(exc), match="a bug"):
        entry_point(fail)([])


def test_a_plain_value_error_inside_a_main_shows_its_traceback():
    """A ValueError from a real bug (here: the weights check, as torch or numpy might raise one)
    inside `python -m regft.models`'s main: traceback, non-zero exit, and not the user-error 2."""
    code = ("import regft.models as m\n"
            "def bug(*a, **k):\n"
            "    raise ValueError('shape mismatch deep in a library')\n"
            "m.check_weights_available = bug\n"
            "raise SystemExit(m.main(['--model', 'tiny']))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode not in (0, EXIT_USAGE), out
    assert "Traceback" in out.stderr and "ValueError: shape mismatch deep in a library" in out.stderr
    assert not out.stderr.startswith("error: ")


class _WorkerGroupError(Exception):  # the shape of ray.train.WorkerGroupError
    def __init__(self, failures):
        super().__init__("Training failed due to worker errors")
        self.worker_failures = failures


class _TaskError(Exception):  # the shape of ray.exceptions.RayTaskError
    def __init__(self, cause):
        super().__init__("ray::train()")
        self.cause = cause


def test_a_user_error_raised_inside_ray_wrappers_is_found_first_rank_first():
    user, other = errors.UserError("ingest worker: use --ingest ray_data"), RuntimeError("oom")
    assert errors.user_error_in(user) is user
    wrapped = _WorkerGroupError({1: _TaskError(errors.UserError("rank 1")), 0: _TaskError(user)})
    assert errors.user_error_in(wrapped) is user
    assert errors.user_error_in(_WorkerGroupError({0: _TaskError(other), 1: user})) is user
    try:
        try:
            raise user
        except errors.UserError as e:
            raise RuntimeError("trial failed") from e
    except RuntimeError as chained:
        assert errors.user_error_in(chained) is user
    class _TaskUserError(errors.UserError):  # the shape of RayTaskError(UserError)
        def __init__(self, cause):
            super().__init__("ray::f() (pid=1)\n  File ...\nregft.errors.UserError: ...")
            self.cause = cause
    assert errors.user_error_in(_TaskUserError(user)) is user  # the one line, not the traceback
    loop = _TaskError(None)
    loop.cause = loop  # a cycle ends the walk
    assert errors.user_error_in(loop) is None
    assert errors.user_error_in(_WorkerGroupError({0: other})) is None  # a bug stays a bug


def test_a_block_raises_the_user_error_it_wraps_and_leaves_bugs_alone():
    user = errors.UserError("bad --ingest")
    with pytest.raises(errors.UserError) as e, errors.unwrapped_user_errors():
        raise _WorkerGroupError({0: _TaskError(user)})
    assert e.value is user
    with pytest.raises(_WorkerGroupError), errors.unwrapped_user_errors():
        raise _WorkerGroupError({0: RuntimeError("bug")})
