"""The errors a user can cause (ring 0: imports nothing of regft).

Every error that means "your input was wrong, here is what to change" derives from `RegftError`;
`regft.cli.entry_point` prints those as one line and exits 2. Anything else is a bug and keeps its
traceback. Each class also keeps the builtin base it always had (`ValueError`, or `RuntimeError`
for `WeightsUnavailable`), so code that catches the builtin type around a call keeps working.

The modules that raise them import them from here (`regft.tasks.TaskError`,
`regft.export.ExportError`, ... stay valid names).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


class RegftError(Exception):
    """Base of every user-facing error."""


class UserError(RegftError, ValueError):
    """Bad input from the user. `problems` holds every problem found, reported together."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


class TaskError(RegftError, ValueError):
    """Unknown task or invalid class names (regft.tasks)."""


class WeightsUnavailable(RegftError, RuntimeError):
    """Pretrained weights (CLIP or a diffusion model) are neither cached nor downloadable."""


class EnsembleError(RegftError, ValueError):
    """The two state dicts cannot be interpolated, or an alpha is outside [0, 1] (regft.ensemble)."""


class ExportError(RegftError, ValueError):
    """An export folder that cannot be written or must not be loaded (regft.export)."""


class DatasetNotReady(RegftError, ValueError):
    """The dataset path has no manifest, or its generation has not finished (regft.store)."""


def user_error_in(error: BaseException) -> RegftError | None:
    """The user-facing error behind `error`, or None: the error itself, or the first one found
    inside what Ray wraps around a remote failure (a Train worker group's `worker_failures` by
    rank, a controller's `controller_failure`, a task's `cause`, or a chained `__cause__`), so a
    user error raised in a Train worker reaches the user as one line, not a worker traceback.
    Duck-typed: this ring imports nothing of Ray."""
    pending, seen = [error], set()
    while pending:
        e = pending.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RegftError):
            # Ray's RayTaskError(UserError) is an instance of the user's class whose text is the
            # remote traceback: the original it carries as `cause` is the one line to show
            inner = getattr(e, "cause", None)
            return inner if isinstance(inner, RegftError) else e
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            pending += [failures[rank] for rank in sorted(failures, key=str)]
        for inner in (getattr(e, "controller_failure", None), getattr(e, "cause", None), e.__cause__):
            if isinstance(inner, BaseException):
                pending.append(inner)
    return None


@contextlib.contextmanager
def unwrapped_user_errors() -> Iterator[None]:
    """Re-raise a user error found inside an exception of the block (`user_error_in`) as itself,
    one line for the user; anything else propagates unchanged."""
    try:
        yield
    except Exception as e:
        user = user_error_in(e)
        if user is None:
            raise
        raise user from None
