"""Shared zero-shot work (regft.shared_work): a trial that reads the search's shared head, decoded
splits and zero-shot accuracies reports bit-identical numbers to one that computes them itself.

The trial's steps after training run in-process, as the Ray Train worker runs them
(regft.train: build_zero_shot, Evaluator, choose_worker_alpha, report_only_numbers) on one
rank: no Ray, seconds. The fine-tuned weights are theta_0 moved by a seeded step, so every alpha
gives a different model."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regft import store as st
from regft.loop import precision_for
from regft.realdata import Audit
from regft.shared_work import KINDS, SharedWork
from regft.train import (
    Evaluator,
    Progress,
    TrainConfig,
    Worker,
    build_zero_shot,
    choose_worker_alpha,
    clip_transforms,
    report_only_numbers,
    resolve_train_task,
)

NAMES = ["red", "green", "blue", "yellow"]
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 60, 230], [230, 220, 40]], dtype=np.uint8)


def square(k: int, rng, size: int = 32) -> np.ndarray:
    img = rng.integers(100, 156, (size, size, 3), dtype=np.uint8)
    x, y = rng.integers(0, size // 2, 2)
    img[y:y + size // 2, x:x + size // 2] = COLOURS[k]
    return img


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    rng = np.random.default_rng(0)
    rows = [(f"{k:04d}-{i:05d}", k, NAMES[k], f"a photo of a {NAMES[k]}.", i,
             st.encode_png(square(k, rng))) for k in range(len(NAMES)) for i in range(40)]
    dataset = st.write_dataset(str(root / "ds"), rows, "colours", NAMES, 32)
    real = root / "real"
    for k, name in enumerate(NAMES):
        (real / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(square(k, rng)).save(real / name / f"{i}.png")
    names = root / "colours.txt"
    names.write_text("\n".join(NAMES) + "\n")
    return {"dataset": dataset, "real": str(real), "classnames": str(names)}


def config(colours, **over) -> TrainConfig:
    values = {"eval_batch_size": 7, "val_fraction": 0.25, **over}
    return TrainConfig(task="colours", classnames=colours["classnames"], model="tiny",
                       pretrained=None, real_test=colours["real"], real_val=colours["real"], **values)


def trial_numbers(cfg: TrainConfig, dataset: str, shared: str | None) -> dict:
    """The final report's wire dict of a trial whose fine-tuned weights are theta_0 + a seeded
    step, its selection and reported-only numbers computed by the worker's own steps."""
    device = torch.device("cpu")
    w = Worker(cfg=cfg, task=resolve_train_task(cfg), rank=0, world=1, device=device,
               audit=Audit(None), precision=precision_for(cfg.precision, device),
               shared=SharedWork(shared))
    zs = build_zero_shot(w, expected_train_pil=repr(clip_transforms(cfg)[0].pil))
    ev = Evaluator(w, dataset, zs)
    g = torch.Generator().manual_seed(1)
    theta_1 = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in zs.theta_0.items()}
    progress = Progress(best_epoch=1, theta_1=theta_1)
    choice = choose_worker_alpha(w, ev, zs, progress, zs.classifier)
    return report_only_numbers(w, ev, zs, progress, choice, zs.classifier).to_dict()


def entries(root: Path) -> dict[str, int]:
    return {kind: len(list((root / kind).glob("*"))) for kind in KINDS}


@pytest.mark.parametrize("report_curves", [True, False])
def test_shared_work_changes_no_number(colours, tmp_path, report_curves):
    """Without sharing, computing the shared work (first trial) and reading it (every later
    trial, or a resumed / second search): the same final report, float for float."""
    cfg = config(colours, report_alpha_curves=report_curves)
    alone = trial_numbers(cfg, colours["dataset"], None)
    first = trial_numbers(cfg, colours["dataset"], str(tmp_path / "shared"))
    assert entries(tmp_path / "shared") == {"head": 1, "decoded": 3, "zs_acc": 3}
    later = trial_numbers(cfg, colours["dataset"], str(tmp_path / "shared"))
    assert json.dumps(first, sort_keys=True) == json.dumps(alone, sort_keys=True)
    assert json.dumps(later, sort_keys=True) == json.dumps(alone, sort_keys=True)
    assert entries(tmp_path / "shared") == {"head": 1, "decoded": 3, "zs_acc": 3}  # nothing new


def test_trials_read_the_shared_values_and_keys_follow_the_inputs(colours, tmp_path):
    """A later trial takes theta_0's accuracies from the store (a value planted there is what it
    reports), and a change to what the numbers depend on (the split rule, the eval batch) makes
    new entries instead of reusing those."""
    root = tmp_path / "shared"
    cfg = config(colours)
    trial_numbers(cfg, colours["dataset"], str(root))
    for f in (root / "zs_acc").glob("*.json"):
        f.write_text(json.dumps({"accuracy": 0.125}))
    planted = trial_numbers(cfg, colours["dataset"], str(root))
    assert {planted[f"zs_{s}_acc"] for s in ("synthetic_val", "real_val", "real_test")} == {0.125}
    assert all(v == 0.125 for a, v in planted["alpha_curve"] if a == 0.0)
    # the val split rule changes synthetic_val only; the real splits' planted values still count
    numbers = trial_numbers(config(colours, val_fraction=0.5), colours["dataset"], str(root))
    assert numbers["zs_synthetic_val_acc"] != 0.125
    assert numbers["zs_real_val_acc"] == numbers["zs_real_test_acc"] == 0.125
    numbers = trial_numbers(config(colours, eval_batch_size=5), colours["dataset"], str(root))
    assert 0.125 not in {numbers[f"zs_{s}_acc"] for s in ("synthetic_val", "real_val", "real_test")}
    assert entries(root)["zs_acc"] == 3 + 1 + 3  # val split rule: synthetic_val; batch: every split
    assert entries(root)["head"] == 1  # the head depends on neither
