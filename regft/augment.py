"""The train split's decode + augmentation, one row at a time (what Ray Data's tasks run for
regft.train's pipeline: torch + PIL, no Ray).

A module of its own because a Ray Data task imports the module of the callable it runs (and so
does the pipeline's coordinator, which holds the plan): here that is torch, torchvision and PIL,
which the augmentation needs, not open_clip and Ray Train, which regft.train imports.
"""
from __future__ import annotations

import numpy as np
import torch

from regft.engine import to_uint8
from regft.images import decode_image

FLOAT_MANTISSA = 2**53  # a uniform float in [0, 1) -> a distinct integer seed (53-bit mantissa)


class DecodeAugment:
    """Ray Data map: PNG bytes -> uint8 (B, 3, H, W) after the PIL part of a CLIP transform.

    Each row's random augmentation is drawn from its own `aug_seed` column (regft.train's
    train_dataset), so it depends on the row and the epoch, not on which task or batch the row
    landed in."""

    def __init__(self, pil_transform):
        self.pil_transform = pil_transform

    def __call__(self, batch: dict) -> dict:
        images = []
        for png, u in zip(batch["image"], batch["aug_seed"]):
            # torchvision's random transforms draw from torch's default CPU generator; this is a
            # Ray Data worker process, so re-seeding it per row disturbs nothing else. (Not
            # torch.manual_seed: it also seeds every accelerator backend, and per row that cut
            # the pipeline's throughput to a third.)
            torch.default_generator.manual_seed(int(float(u) * FLOAT_MANTISSA))
            images.append(to_uint8(self.pil_transform(decode_image(png))).numpy())
        return {"image": np.stack(images), "label": np.asarray(batch["label"], dtype=np.int64)}
