"""Shared CLI plumbing: user errors become one line on stderr and exit code 2, never a traceback;
anything else is a bug and keeps its traceback."""
from __future__ import annotations

import functools
import io
import logging
import os
import re
import reprlib
import sys
import urllib.parse
from collections.abc import Callable
from typing import Any

from regft.errors import RegftError, UserError  # noqa: F401  (UserError: re-exported, the long-standing import path)

EXIT_USAGE = 2
_SECRET_KEY = re.compile(  # not a bare "key" (messages name keys) nor "tokens" (counts)
    r"(secret|password|passwd|pwd|token(?!s\b|iz)|api[_-]?key|access[_-]?key|credential|"
    r"authorization|auth[_-]?token|^auth$|signature|private[_-]?key|session[_-]?key|^sig$)", re.I)
_SECRET_VALUE = re.compile(r"(AKIA[0-9A-Z]{16}|(?:sk|hf|ghp|gho|github_pat|xox[bap])[-_][A-Za-z0-9_-]{16,})")
MASK = "***"
# A URI inside free text: scheme://, then anything up to white space or a quote (a password may
# hold '/', '@', ':' or '%xx'; the last '@' before the query ends the userinfo)
_URI = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^\s'\"`<>]*)")
# query (and fragment) keys whose values say where, not who: kept so errors stay useful
_PLAIN_QUERY_KEYS = frozenset({
    "region", "scheme", "endpoint_override", "endpoint", "allow_bucket_creation",
    "allow_bucket_deletion", "timeout", "connect_timeout", "request_timeout", "sslmode", "mode",
    "charset", "driver", "application_name", "versionid", "prefix"})
# KEY=VALUE / KEY: VALUE / "KEY": "VALUE" in free text, KEY secret-looking (env dumps, JSON, DSNs)
_ASSIGNMENT = re.compile(
    r"""(?P<key>["']?[A-Za-z_][\w.-]*["']?)(?P<sep>\s*[=:]\s*)(?P<q>["'])?"""
    r"""(?P<value>(?(q)[^"']*|[^\s,;&}\]'"]+))""")
# an HTTP Authorization header: its scheme word (Basic, Bearer) is followed by the credential
_AUTH_HEADER = re.compile(
    r"""(?i)(authorization["']?\s*[:=]\s*["']?)(?:(?:basic|bearer|token|digest)\s+)?[^\s"',;]+""")


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
    """Hide anything that looks like a credential before it is logged, printed or tracked.

    Containers are walked; a value under a secret-looking key is masked whole. In text: every
    URI is parsed (`redact_uri`: the password of its userinfo, or the whole userinfo when it has
    no user:password shape, and the values of its query and fragment); secret-looking
    KEY=VALUE, KEY: VALUE and "KEY": "VALUE" assignments; known key formats (AWS, OpenAI, HF,
    GitHub, Slack); and the literal secrets of the running command (`remember_secrets`),
    percent-encoded or not, wherever a library echoes them."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if isinstance(value, str):
        if key and _SECRET_KEY.search(key):
            return MASK
        return _redact_text(value)
    return value


def _redact_text(text: str) -> str:
    for secret in sorted(_SECRETS, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    text = _AUTH_HEADER.sub(lambda m: m.group(1) + MASK, text)
    text = _ASSIGNMENT.sub(_mask_assignment, text)
    return _SECRET_VALUE.sub(MASK, text)


def _mask_assignment(m: re.Match) -> str:
    if not _SECRET_KEY.search(m.group("key").strip("\"'")) or m.group("value") in ("", MASK):
        return m.group(0)
    return f"{m.group('key')}{m.group('sep')}{m.group('q') or ''}{MASK}"


def redact_uri(uri: str) -> str:
    """`uri` with its credentials masked, by parsing it: scheme://USER:***@host/path?k=***#f=***.
    The userinfo ends at the LAST '@' before the query, so a password holding '@', '/' or ':'
    is masked whole; a userinfo without ':' (a bare token) is masked whole; query and fragment
    values are masked unless their key says where, not who (_PLAIN_QUERY_KEYS)."""
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*://)(.*)", uri, re.S)
    if not m:
        return uri
    scheme, rest = m.groups()
    rest, hash_, fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    userinfo, at, hostpath = rest.rpartition("@")
    if at:
        user, colon, _ = userinfo.partition(":")
        userinfo = f"{user}:{MASK}" if colon and "/" not in user else MASK
    parts = [scheme, userinfo, at, hostpath]
    if qmark:
        parts += ["?", _redact_query(query)]
    if hash_:
        parts += ["#", _redact_query(fragment)]
    return "".join(parts)


def _redact_query(query: str) -> str:
    out = []
    for item in re.split(r"([&;])", query):
        name, eq, val = item.partition("=")
        if eq and val and name.lower() not in _PLAIN_QUERY_KEYS:
            val = MASK
        elif eq and "://" in val:  # a URI as a value (endpoint_override=http://u:p@h)
            val = redact_uri(val)
        out.append(f"{name}{eq}{val}")
    return "".join(out)


# Secrets the running command was given (argv URIs' passwords and query values, secret-looking
# environment variables): masked verbatim wherever they show up, whatever shape a library's
# message gives them. Filled by `remember_secrets` (entry_point does it for its argv).
_SECRETS: set[str] = set()
MIN_SECRET_CHARS = 6  # shorter values ("1", "true", a port) would mask ordinary words
_SECRET_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|API_KEY|ACCESS_KEY|CREDENTIAL)", re.I)


def remember_secrets(argv: list[str] | None = None, environ: dict[str, str] | None = None) -> None:
    """Collect the literal secrets in `argv` (and the environment): `redact` masks them."""
    found = [v for k, v in (os.environ if environ is None else environ).items()
             if _SECRET_ENV.search(k) and not k.startswith("TOKENIZERS")]
    for arg in argv or ():
        for m in _URI.finditer(str(arg)):
            found += _uri_secrets(m.group(0))
        key, eq, val = str(arg).lstrip("-").partition("=")
        if eq and _SECRET_KEY.search(key):
            found.append(val)
    for v in found:
        for form in {v, urllib.parse.unquote(v), urllib.parse.quote(v, safe="")}:
            if len(form) >= MIN_SECRET_CHARS:
                _SECRETS.add(form)


def _uri_secrets(uri: str) -> list[str]:
    rest = uri.split("://", 1)[1]
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    userinfo, at, _ = rest.rpartition("@")
    out = [userinfo.partition(":")[2] or userinfo] if at else []
    for item in re.split(r"[&;]", f"{query}&{fragment}"):
        name, eq, val = item.partition("=")
        if eq and val and name.lower() not in _PLAIN_QUERY_KEYS:
            out.append(val)
    return out


def redact_printed(text: str) -> str:
    """Redaction for everything a command prints (cheap, so every line can take it): the
    command's own secrets and the credentials of URIs. Ordinary text passes unchanged."""
    if "://" in text or any(secret in text for secret in _SECRETS):
        for secret in sorted(_SECRETS, key=len, reverse=True):
            text = text.replace(secret, MASK)
        text = _URI.sub(lambda m: redact_uri(m.group(0)), text)
    return text


class RedactingTextIO(io.TextIOWrapper):
    """A text stream that writes `redact_printed(text)`: a print of a store path holding
    s3://KEY:SECRET@bucket never shows the secret (regft.console makes Python's streams these)."""

    def write(self, text: str) -> int:
        super().write(redact_printed(text))
        return len(text)


# What a user can cause: regft's own errors (regft.errors) and a path they named that is missing
# or closed to them. Any other exception, a ValueError from torch included, is a bug: it keeps
# its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (RegftError, FileNotFoundError, PermissionError)
EXIT_INTERRUPTED = 130  # the shell's code for SIGINT (128 + 2)


def entry_point(fn: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Wrap `main(argv) -> int` so user errors (USER_ERRORS) print `error: ...` and return 2."""

    @functools.wraps(fn)
    def main(argv: list[str] | None = None) -> int:
        remember_secrets(sys.argv[1:] if argv is None else argv)
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
