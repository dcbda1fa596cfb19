"""Shared CLI plumbing: user errors become one line on stderr and exit code 2, never a traceback;
anything else is a bug and keeps its traceback."""
from __future__ import annotations

import functools
import logging
import os
import re
import reprlib
import sys
from collections.abc import Callable
from typing import Any

from regft.errors import RegftError, UserError  # noqa: F401  (UserError: re-exported, the long-standing import path)

EXIT_USAGE = 2
_SECRET_KEY = re.compile(r"(secret|password|passwd|token|api[_-]?key|access[_-]?key|credential)", re.I)
_SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|(?:sk|hf|ghp|xox[bap])[-_][A-Za-z0-9_-]{16,})")


SHORT_LIMIT = 60  # characters of a user's value an error message quotes: enough to recognise it
# A bounded repr: a container (a YAML alias bomb, a huge list) is never rendered whole.
_BOUNDED = reprlib.Repr()
_BOUNDED.maxstring = _BOUNDED.maxother = _BOUNDED.maxlong = 2 * SHORT_LIMIT
_BOUNDED.maxlist = _BOUNDED.maxtuple = _BOUNDED.maxdict = _BOUNDED.maxset = _BOUNDED.maxfrozenset = 8
_BOUNDED.maxlevel = 3
_REDACT_WINDOW = 4096  # of a huge string only this head is redacted (and a prefix of it quoted)


def shorten(value: Any, limit: int = SHORT_LIMIT) -> str:
    """repr-like text of `value` at most about `limit` characters long, for error messages.

    A str/bytes longer than `limit` becomes the repr of its first `limit` characters plus
    "…(N chars)"; a container whose text would be longer becomes a prefix plus "…(N items)". The
    whole value is never rendered (no huge repr of a huge input); control characters are escaped
    the way repr escapes them, so the text is always one line. A string is redacted first."""
    if isinstance(value, (str, bytes, bytearray)):
        size = len(value)
        if isinstance(value, str):  # redact before cutting: a cut URI hides where its secret ends
            value = redact(value[:_REDACT_WINDOW])
        text = repr(value[: limit + 1])  # escapes can make it longer than the value: cut the text
        return text if size <= limit and len(text) <= limit + 3 else f"{text[:limit]}…({size} chars)"
    try:
        text = _BOUNDED.repr(value)
    except Exception:  # a broken __repr__ must not hide the error being reported
        text = f"<{type(value).__name__}>"
    text = text.replace("\n", " ").replace("\r", " ")
    cut = "..." in text  # reprlib left items out
    if len(text) <= limit and not cut:
        return text
    try:
        return f"{text[:limit].removesuffix('...')}…({len(value)} items)"
    except TypeError:
        return f"{text[:limit]}…"


def redact(value: Any, key: str = "") -> Any:
    """Hide anything that looks like a credential before it is logged, printed or tracked:
    values under secret-looking keys, known key formats (AWS, OpenAI, HF, GitHub, Slack) and the
    password of a URI (scheme://user:PASSWORD@host)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if isinstance(value, str):
        if key and _SECRET_KEY.search(key):
            return "***"
        value = _SECRET_VALUE.sub("***", value)
        return re.sub(r"(://[^/:@\s]+:)[^@/\s]+@", r"\1***@", value)
    return value


# What a user can cause: regft's own errors (regft.errors) and a path they named that is missing
# or closed to them. Any other exception, a ValueError from torch included, is a bug: it keeps
# its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (RegftError, FileNotFoundError, PermissionError)
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT (128 + 2)


def entry_point(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap `main(argv) -> int` so user errors (USER_ERRORS) print `error: ...` and return 2."""

    @functools.wraps(fn)
    def main(argv: list[str] | None = None) -> int:
        try:
            return int(fn(argv) or 0)
        except SystemExit as e:  # argparse errors already printed their message
            return e.code if isinstance(e.code, int) else EXIT_USAGE
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        except USER_ERRORS as e:
            if os.environ.get("REGFT_DEBUG"):
                logging.exception("user error")
            print(f"error: {redact(str(e))}", file=sys.stderr)
            return EXIT_USAGE

    return main
