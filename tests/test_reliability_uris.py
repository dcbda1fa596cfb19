"""Issue 19 items 4, 5, 6, 13a: storage and tracking URIs are checked for what they are, fail fast
naming their flag, and no credential is ever printed."""
from __future__ import annotations

import pytest

from regft.cli import shorten


@pytest.mark.parametrize(
    "value",
    [
        "x" * 10_000,
        "é\n\x00" * 5_000,
        b"\xff" * 10_000,
        list(range(100_000)),
        {str(i): [i] * 100 for i in range(10_000)},
        [[[[["deep"] * 50] * 50] * 50] * 50],
        10 ** 4000,
        object(),
    ],
    ids=["long-str", "control-chars", "bytes", "long-list", "big-dict", "nested", "huge-int", "object"],
)
def test_shorten_is_short_and_one_line(value):
    text = shorten(value)
    assert len(text) < 100
    assert "\n" not in text and "\x00" not in text


def test_shorten_keeps_short_values_as_repr_and_counts_long_ones():
    assert shorten("lr") == "'lr'"
    assert shorten([1, 2]) == "[1, 2]"
    assert shorten(0.5) == "0.5"
    long = shorten("a" * 1000, limit=10)
    assert long.startswith("'aaaaaaaaa") and len(long) < 30 and "1000 chars" in long
    assert "100000 items" in shorten(list(range(100_000)))


class _BadRepr:
    def __repr__(self):
        raise RuntimeError("broken")


def test_shorten_survives_a_broken_repr():
    assert "_BadRepr" in shorten(_BadRepr())
