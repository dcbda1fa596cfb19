"""regft.loop: the shared training loop (train_epoch, choose_alpha, fit) on tiny seeded tensors.
Plain torch, no Ray; seconds."""
import math

import pytest
import torch
from conftest import COLOUR_CLASSES, colour_images

from regft import engine, loop
from regft.engine import EvalSet, split_clip_transform, state_dict_cpu
from regft.models import build_classifier, create_clip
from regft.tasks import Task
from regft.train import TrainConfig

TASK = Task(name="colours", classnames=COLOUR_CLASSES)


def tiny_classifier():
    bundle = create_clip("tiny", None, seed=0)
    return bundle, build_classifier(bundle, TASK)


def test_precision_policy():
    cpu = torch.device("cpu")
    assert loop.precision_for("auto", cpu) == loop.Precision(None, None)
    assert loop.precision_for("bf16", cpu).autocast_dtype is torch.bfloat16
    assert loop.precision_for("fp32", cpu) == loop.Precision(None, None)


def test_train_epoch_means_equal_the_steps_it_ran():
    """EpochStats are the means of engine.train_step's outputs over the epoch, counted images."""
    torch.manual_seed(0)
    bundle, model = tiny_classifier()
    tf = split_clip_transform(bundle.preprocess_eval)
    images, labels = colour_images(24, seed=1)
    x = engine.normalize_uint8(torch.from_numpy(images).permute(0, 3, 1, 2), tf.mean, tf.std)
    batches = [(x[i:i + 8], torch.from_numpy(labels[i:i + 8]).long()) for i in range(0, 24, 8)]
    _, reference = tiny_classifier()  # its own bundle: a classifier shares its bundle's tower
    ref_opt = engine.build_optimizer(reference, 1e-3)
    losses = [float(engine.train_step(reference, b, ref_opt, vc_weight=0.16, vc_cov_ratio=0.125)["loss"])
              for b in batches]
    opt = engine.build_optimizer(model, 1e-3)
    stats = loop.train_epoch(model, batches, opt, None, vc_weight=0.16, vc_cov_ratio=0.125,
                             grad_clip=1.0, precision=loop.Precision(None, None),
                             device=torch.device("cpu"))
    assert (stats.batches, stats.images) == (3, 24)
    assert stats.mean["loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)
    assert stats.lr == pytest.approx(1e-3) and not stats.diverged
    assert stats.images_per_s > 0
    for a, b in zip(model.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)  # the same steps, in the same order


def test_epoch_stats_flag_divergence():
    stats = loop.EpochStats(mean={"loss": math.nan}, lr=0.1, batches=1, images=2, seconds=0.0)
    assert stats.diverged and math.isnan(stats.images_per_s)


def test_choose_alpha_sweeps_and_applies_the_rule():
    bundle, model = tiny_classifier()
    theta_0 = state_dict_cpu(model)
    theta_1 = {k: v + 1.0 if v.is_floating_point() else v for k, v in theta_0.items()}
    # accuracy as a function of the weights: the knee of 1 - (1 - a)^4 is at a small alpha
    def acc(m):
        a = float((m.state_dict()["head.linear.weight"] - theta_0["head.linear.weight"]).mean())
        return 1 - (1 - a) ** 4

    choice = loop.choose_alpha(theta_0, theta_1, model, acc, [0.0, 0.25, 0.5, 0.75, 1.0],
                               rule="knee", n_images=100, split="synthetic_val")
    assert [a for a, _ in choice.curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert choice.alpha == engine.select_alpha(choice.curve, "knee", n_val=100)
    assert choice.value == dict(choice.curve)[choice.alpha]
    assert 0.0 < choice.alpha < 1.0


def test_fit_trains_selects_the_best_epoch_and_chooses_alpha():
    bundle, model = tiny_classifier()
    train_tf = split_clip_transform(bundle.preprocess_train)
    eval_tf = split_clip_transform(bundle.preprocess_eval)
    tr_x, tr_y = colour_images(64, seed=2)
    va_x, va_y = colour_images(24, seed=3)
    te_x, te_y = colour_images(24, seed=4)
    evals = {"synthetic_val": EvalSet(loop.ArrayImages(va_x, va_y), batch_size=32),
             "real_test": EvalSet(loop.ArrayImages(te_x, te_y), batch_size=32)}
    cfg = TrainConfig(task="colours", lr=1e-3, batch_size=16, epochs=3, warmup_steps=2,
                      alpha_grid=[0.0, 0.5, 1.0], seed=0)
    result = loop.fit(model, loop.ArrayImages(tr_x, tr_y, train_tf.pil), evals, cfg, eval_tf,
                      report_splits=["real_test"])
    assert [e.epoch for e in result.epochs] == [1, 2, 3] and not result.diverged
    assert all(e.stats.batches == 4 for e in result.epochs)  # 64 / 16, incomplete batches dropped
    assert result.epochs[-1].stats.mean["loss"] < result.epochs[0].stats.mean["loss"]
    by_epoch = {e.epoch: e.accuracy["synthetic_val"] for e in result.epochs}
    assert by_epoch[result.best_epoch] == max(by_epoch.values())
    # the ties-to-later rule: no later epoch is as good as the best one
    assert all(v < by_epoch[result.best_epoch] for e, v in by_epoch.items() if e > result.best_epoch)
    choice = result.choice
    assert choice.split == "synthetic_val" and choice.n_images == 24
    assert choice.alpha == engine.select_alpha(choice.curve, "knee", n_val=24)
    assert dict(choice.curve)[1.0] == by_epoch[result.best_epoch]  # alpha 1 = the best epoch
    assert set(result.curves) == {"synthetic_val", "real_test"}
    # seeded: the same call gives the same weights and curves
    _, again_model = tiny_classifier()
    again = loop.fit(again_model, loop.ArrayImages(tr_x, tr_y, train_tf.pil), evals, cfg, eval_tf,
                     report_splits=["real_test"])
    assert again.curves == result.curves and again.best_epoch == result.best_epoch
