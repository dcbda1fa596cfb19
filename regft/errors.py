"""The errors a user can cause (ring 0: imports nothing of regft).

Every error that means "your input was wrong, here is what to change" derives from `RegftError`;
`regft.cli.entry_point` prints those as one line and exits 2. Anything else is a bug and keeps its
traceback. The subclasses stay `ValueError`s (or `RuntimeError`s) too, so code that catches the
builtin type around a call keeps working.
"""
from __future__ import annotations


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
