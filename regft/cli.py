"""Shared CLI plumbing: user errors become one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

EXIT_USAGE = 2


class UserError(ValueError):
    """Bad input from the user. `problems` holds every problem found, reported together."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        return f"{len(self.problems)} problems:\n" + "\n".join(f"  - {p}" for p in self.problems)


def user_error_types() -> tuple[type[BaseException], ...]:
    from regft.models import WeightsUnavailable

    return (ValueError, WeightsUnavailable, FileNotFoundError, PermissionError)


def entry_point(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap `main(argv) -> int` so user errors print `error: ...` and return 2."""

    @functools.wraps(fn)
    def main(argv: list[str] | None = None) -> int:
        try:
            return int(fn(argv) or 0)
        except SystemExit as e:  # argparse errors already printed their message
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except user_error_types() as e:
            if os.environ.get("REGFT_DEBUG"):
                logging.exception("user error")
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USAGE

    return main
