"""Generation prompts and per-image seeds, pure Python.

An item is (class index, image index, prompt, seed). The seed depends only on
(task, class name, image index, base seed), so an image is a pure function of
(generator, prompt, seed, settings): independent of batching, actor placement or resumes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Item:
    label: int
    index: int  # image index within its class
    classname: str
    prompt: str
    seed: int

    @property
    def item_id(self) -> str:
        return f"{self.label:05d}-{self.index:06d}"


def paper_prompt(template: str, classname: str, index: int) -> str:
    """The paper's strategy: the task's single generation template, filled with the class name."""
    return template.format(classname)


def plain_prompt(template: str, classname: str, index: int) -> str:
    """Plain 'a photo of a {}.' regardless of task."""
    return f"a photo of a {classname}."


_STYLES = ("a photo", "a close-up photo", "a bright photo", "a dark photo", "a cropped photo")


def varied_prompt(template: str, classname: str, index: int) -> str:
    """Cycle a few photographic styles (a cheap diversity alternative, not the paper's)."""
    return f"{_STYLES[index % len(_STYLES)]} of a {classname}."


PROMPT_STRATEGIES = {"paper": paper_prompt, "plain": plain_prompt, "varied": varied_prompt}


def item_seed(task: str, classname: str, index: int, base_seed: int) -> int:
    """A 63-bit seed from a hash of what identifies the image (stable across Python runs)."""
    key = f"{task}\x1f{classname}\x1f{index}\x1f{base_seed}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def make_items(
    task: str,
    gen_classnames: list[str] | tuple[str, ...],
    template: str,
    images_per_class: int,
    base_seed: int = 0,
    strategy: str = "paper",
) -> list[Item]:
    if strategy not in PROMPT_STRATEGIES:
        raise ValueError(f"unknown prompt strategy {strategy!r}; choose from {sorted(PROMPT_STRATEGIES)}")
    if images_per_class <= 0:
        raise ValueError(f"images_per_class must be > 0, got {images_per_class}")
    fn = PROMPT_STRATEGIES[strategy]
    return [
        Item(label, i, name, fn(template, name, i), item_seed(task, name, i, base_seed))
        for label, name in enumerate(gen_classnames)
        for i in range(images_per_class)
    ]
