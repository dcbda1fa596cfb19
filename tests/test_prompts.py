"""Prompts and per-image seeds (pure ring: no Ray, no I/O)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from regft.prompts import PROMPT_STRATEGIES, item_seed, make_items


def test_items_cover_every_class_and_index_in_item_id_order():
    items = make_items("cars", ["Audi A4", "BMW M3", "Ford GT"], "a photo of a {}, a type of car.", 3)
    assert [(it.label, it.index) for it in items] == [(k, i) for k in range(3) for i in range(3)]
    ids = [it.item_id for it in items]
    assert ids == sorted(ids) and len(set(ids)) == 9  # label-major == item_id order, no duplicates
    assert items[4].prompt == "a photo of a BMW M3, a type of car."
    assert items[4].classname == "BMW M3"


def test_seed_depends_on_task_class_index_and_base_seed_only():
    s = item_seed("cars", "Audi A4", 5, 0)
    assert s == item_seed("cars", "Audi A4", 5, 0)  # stable (sha256, not Python's salted hash)
    others = {item_seed("pets", "Audi A4", 5, 0), item_seed("cars", "BMW M3", 5, 0),
              item_seed("cars", "Audi A4", 6, 0), item_seed("cars", "Audi A4", 5, 1)}
    assert s not in others and len(others) == 4
    assert 0 <= s < 2**63  # fits parquet int64 and torch.Generator.manual_seed


def test_seed_values_are_pinned():
    # the seed derivation is not hashed into dataset ids: changing it silently changes the images
    # behind every stored dataset id, so it must be deliberate (with a store format bump)
    assert item_seed("cars", "Audi A4", 0, 0) == 5147655659104661074
    assert item_seed("cars", "Audi A4", 1, 7) == 3986994820902963857
    assert make_items("t", ["a", "b"], "{}", 1)[1].seed == item_seed("t", "b", 0, 0)


def test_strategies_differ_and_unknown_ones_are_rejected():
    prompts = {name: make_items("t", ["cat", "dog"], "a photo of a {}, a pet.", 2, strategy=name)[1].prompt
               for name in PROMPT_STRATEGIES}
    assert prompts["paper"] == "a photo of a cat, a pet."
    assert prompts["plain"] == "a photo of a cat."
    assert len(set(prompts.values())) == len(prompts)
    with pytest.raises(ValueError, match="unknown prompt strategy 'llm'"):
        make_items("t", ["cat"], "{}", 1, strategy="llm")
    with pytest.raises(ValueError, match="images_per_class must be > 0"):
        make_items("t", ["cat"], "{}", 0)


def test_prompts_module_is_pure():
    code = "import sys, regft.prompts; print(any(m in sys.modules for m in ('ray', 'torch', 'mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
