"""Typed config helpers: dataclasses built from dicts that reject unknown keys and report every
problem at once (a typo in a key must never silently fall back to a default)."""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

from regft.cli import UserError

T = TypeVar("T")


def _check_type(name: str, value: Any, tp: Any) -> str | None:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return None
    if origin is typing.Union or origin is types.UnionType:
        return None if any(_check_type(name, value, a) is None for a in args) else (
            f"{name}: expected {tp}, got {value!r}"
        )
    if tp is type(None):
        return None if value is None else f"{name}: expected None, got {value!r}"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
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
    return None if ok else f"{name}: expected {getattr(tp, '__name__', tp)}, got {value!r}"


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
        problems.append(f"{where}: unknown key {key!r} (known: {', '.join(sorted(fields))})")
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
