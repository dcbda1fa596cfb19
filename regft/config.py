"""Typed config helpers: dataclasses built from dicts that reject unknown keys and report every
problem at once (a typo in a key must never silently fall back to a default); the one number
check every float flag and field goes through (`finite_float`, `non_finite`); the seed range;
and the one reader of the text files a user names (`read_user_text`)."""
from __future__ import annotations

import argparse
import codecs
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from regft.cli import UserError, shorten

T = TypeVar("T")

# Seeds: the base seed reaches numpy's legacy RandomState (Optuna's TPE sampler), which takes
# 0 .. 2**32 - 1, and training derives seed + 1 from it (the augmentation stream): the largest
# seed every consumer accepts is one less.
SEED_MIN, SEED_MAX = 0, 2**32 - 2
# The byte-order marks of encodings a text editor saves that are not UTF-8 (longest first: the
# UTF-32-LE mark starts with the UTF-16-LE one)
_FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
TO_UTF8 = "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8)"


def non_finite(value: Any) -> bool:
    """True for a float that is NaN or infinite (what every float setting refuses)."""
    return isinstance(value, float) and not math.isfinite(value)


def finite_float(text: str) -> float:
    """argparse type of every float flag: a finite number. NaN would switch a comparison-guarded
    setting off silently (NaN < 0 is False), and '1e400' parses to infinity."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {shorten(text)}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {shorten(text)}")
    return value


def seed_problem(seed: Any, label: str) -> str | None:
    """None if `seed` is an int every seeded component accepts, else a message naming `label`."""
    if isinstance(seed, int) and not isinstance(seed, bool) and SEED_MIN <= seed <= SEED_MAX:
        return None
    return f"{label}: must be an integer in {SEED_MIN}..{SEED_MAX}, got {shorten(seed)}"


def flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """{dest: flag} for a parser's optional arguments (how its messages name a setting)."""
    return {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}


def empty_value_problems(args: argparse.Namespace, flags: dict[str, str],
                         allowed: tuple[str, ...] = ()) -> list[str]:
    """The flags given an empty (or blank) text: `--dataset ''` would otherwise read as "not
    given" and fall back to a default the user did not ask for. `allowed`: dests where empty
    means something (documented in their help)."""
    return [f"{flags[d]}: empty value; give one or leave the flag out"
            for d, v in vars(args).items()
            if d in flags and d not in allowed and isinstance(v, str) and not v.strip()]


def non_finite_fields(obj: Any) -> list[str]:
    """The float fields of dataclass `obj` (lists of floats included) holding NaN or infinity."""
    bad = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if non_finite(v) or (isinstance(v, (list, tuple)) and any(non_finite(x) for x in v)):
            bad.append(f.name)
    return bad


def read_user_text(path: str | Path, flag: str, max_bytes: int) -> str:
    """The text of a file the user named with `flag`, read defensively: a folder, a missing or
    unreadable file, one over `max_bytes`, a UTF-16/32 file, bytes that are not UTF-8 (reported
    with their line and the fix) and NUL characters are refused naming `flag`; a UTF-8 byte-order
    mark is dropped. Line endings are kept as written."""
    p = Path(path)
    where = f"{flag} {shorten(str(p))}"
    if not p.exists():
        raise UserError(f"{where}: file not found")
    if not p.is_file():
        raise UserError(f"{where}: not a file")
    try:
        size = p.stat().st_size
        if size > max_bytes:
            raise UserError(f"{where}: {size} bytes, more than the {max_bytes} such a file can "
                            "need; is it the right file?")
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"{where}: cannot read it ({e.strerror or type(e).__name__})") from None
    for bom, name in _FOREIGN_BOMS:
        if data.startswith(bom):
            raise UserError(f"{where}: {name} text, not UTF-8; {TO_UTF8.replace('latin1', name.lower())}")
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{where}: line {line} is not UTF-8 (byte 0x{data[e.start]:02x}); "
                        f"{TO_UTF8}") from None
    if "\0" in text:
        raise UserError(f"{where}: line {text.count(chr(10), 0, text.index(chr(0))) + 1} holds a NUL "
                        "character: a binary file, or text saved in another encoding; " + TO_UTF8)
    return text


def _check_type(name: str, value: Any, tp: Any) -> str | None:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return None
    if origin is typing.Union or origin is types.UnionType:
        return None if any(_check_type(name, value, a) is None for a in args) else (
            f"{name}: expected {tp}, got {shorten(value)}"
        )
    if tp is type(None):
        return None if value is None else f"{name}: expected None, got {shorten(value)}"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and non_finite(value):
            return f"{name}: expected a finite number, got {value!r}"
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is bool:
        ok = isinstance(value, bool)
    elif tp is str:
        ok = isinstance(value, str)
    elif origin in (list, tuple):
        ok = isinstance(value, (list, tuple))
    elif origin is dict or tp is dict:
        ok = isinstance(value, dict)
    else:
        ok = True
    return None if ok else f"{name}: expected {getattr(tp, '__name__', tp)}, got {shorten(value)}"


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", validate: bool = True) -> T:
    """Build dataclass `cls` from `data`; unknown keys and type errors are all reported at once.

    Float fields accept ints (converted). After construction, a `validate()` method returning a
    list of problems, if the class has one, is run and its problems are added (`validate=False`:
    the caller validates later, e.g. once the fields other sources set are in).
    """
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems = []
    unknown = sorted(set(data) - set(fields))
    for key in unknown:
        problems.append(f"{where}: unknown key {shorten(key)} (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            continue
        err = _check_type(f"{where}.{key}", value, hints[key])
        if err:
            problems.append(err)
            continue
        if hints[key] is float and isinstance(value, int):
            value = float(value)
        kwargs[key] = value
    missing = [
        n for n, f in fields.items()
        if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for n in missing:
        problems.append(f"{where}: missing required key {n!r}")
    if problems:
        raise UserError(problems)
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None) if validate else None
    if callable(check):
        more = check()
        if more:
            raise UserError([f"{where}: {p}" for p in more])
    return obj
