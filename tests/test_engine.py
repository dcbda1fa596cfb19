"""Plain-torch training pieces (regft.engine) on the tiny CLIP: no Ray, seconds."""
import copy
import math

import numpy as np
import pytest
import torch
from conftest import COLOUR_CLASSES, colour_images
from PIL import Image
from torchvision import transforms as T

from regft.engine import (
    EvalSet,
    alpha_sweep,
    build_optimizer,
    build_scheduler,
    evaluate,
    normalize_uint8,
    select_alpha,
    split_clip_transform,
    state_dict_cpu,
    train_step,
    warmup_cosine,
)
from regft.models import build_classifier, create_clip
from regft.tasks import Task

TASK = Task(name="colours", classnames=COLOUR_CLASSES)


def colour_batch(n: int, seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable task: class k is a noisy square of colour k on a grey background."""
    imgs, labels = colour_images(n, seed, size)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # (N, H, W, 3) -> (N, 3, H, W)
    return x, torch.from_numpy(labels).long()


@pytest.fixture(scope="module")
def tiny():
    bundle = create_clip("tiny", None, seed=0)
    model = build_classifier(bundle, TASK)
    split = split_clip_transform(bundle.preprocess_eval)
    return bundle, model, split


def norm_batch(split, n, seed):
    x, y = colour_batch(n, seed)
    return normalize_uint8(x, split.mean, split.std), y


def test_schedule_warmup_then_cosine_to_zero():
    assert warmup_cosine(0, 10, 100) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 100) == pytest.approx(1.0)
    assert warmup_cosine(55, 10, 100) == pytest.approx(0.5)
    assert warmup_cosine(100, 10, 100) == pytest.approx(0.0, abs=1e-12)
    assert warmup_cosine(3, 0, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    assert warmup_cosine(5, 10, 8) == pytest.approx(0.6)  # warm-up longer than the run


def test_optimizer_is_adamw_over_all_parameters(tiny):
    _, model, _ = tiny
    opt = build_optimizer(model, lr=1e-4)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    n_opt = sum(p.numel() for g in opt.param_groups for p in g["params"])
    assert n_opt == sum(p.numel() for p in model.parameters())


def test_split_transform_composes_to_the_bundle_transform(tiny):
    bundle, _, _ = tiny
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8))
    split = split_clip_transform(bundle.preprocess_eval)
    ours = normalize_uint8(split.to_uint8(img)[None], split.mean, split.std)[0]
    torch.testing.assert_close(ours, bundle.preprocess_eval(img), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="ToTensor"):
        split_clip_transform(split.pil)


def test_split_transforms_pickle_without_open_clip(tiny):
    """A split train/eval transform unpickles without importing open_clip (every Ray Data process
    of a trial unpickles the train one), and does what open_clip's own ops do, bit for bit."""
    import pickle
    import pickletools

    bundle, _, _ = tiny
    rng = np.random.default_rng(1)
    grey = Image.fromarray(rng.integers(0, 255, (40, 52), dtype=np.uint8))  # mode L: converted
    for transform in (bundle.preprocess_train, bundle.preprocess_eval):
        assert any(type(op).__module__.startswith("open_clip") for op in transform.transforms)
        split = split_clip_transform(transform)
        names = {a for _, a, _ in pickletools.genops(pickle.dumps(split.pil)) if isinstance(a, str)}
        assert not any(n.startswith("open_clip") for n in names), names
        assert repr(split.pil) == repr(T.Compose(transform.transforms[:-2]))
        torch.manual_seed(3)
        ours = normalize_uint8(split.to_uint8(grey)[None], split.mean, split.std)[0]
        torch.manual_seed(3)
        torch.testing.assert_close(ours, transform(grey), rtol=0, atol=1e-6)


def test_loss_decreases_on_a_learnable_task(tiny):
    _, model0, split = tiny
    model = copy.deepcopy(model0)
    opt = build_optimizer(model, lr=1e-3)
    sched = build_scheduler(opt, warmup_steps=2, total_steps=15)
    torch.manual_seed(0)
    batch_val = norm_batch(split, 64, seed=999)
    before = torch.nn.functional.cross_entropy(model(batch_val[0]), batch_val[1]).item()
    losses = []
    for step in range(15):
        out = train_step(model, norm_batch(split, 32, seed=step), opt, sched,
                         vc_weight=0.16, vc_cov_ratio=0.125, grad_clip=1.0)
        losses.append(out["ce_loss"].item())
        assert set(out) >= {"loss", "ce_loss", "vc_loss", "vc_variance", "vc_covariance", "lr"}
    after = torch.nn.functional.cross_entropy(model(batch_val[0]), batch_val[1]).item()
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert after < 0.5 * before
    assert evaluate(model, [batch_val]).acc > 0.9
    assert out["lr"].item() == pytest.approx(1e-3 * warmup_cosine(14, 2, 15))


def reference_vc(z, a, b):
    """method.md's formula, written independently of regft.losses."""
    cov = torch.cov(z.T, correction=1)
    d = z.shape[1]
    v = torch.clamp(1 - torch.sqrt(torch.diag(cov) + 1e-7), min=0).sum() / d
    off = cov[~torch.eye(d, dtype=torch.bool)]
    return a * v + b * (off ** 2).sum() / (d * (d - 1))


def grads_after_step(model, batch, vc_weight):
    m = copy.deepcopy(model)
    opt = build_optimizer(m, lr=0.0)  # lr 0: the step leaves the weights unchanged
    train_step(m, batch, opt, None, vc_weight=vc_weight, vc_cov_ratio=0.5, grad_clip=0.0)
    return {n: p.grad.clone() for n, p in m.named_parameters()}


def test_vc_weight_changes_the_gradient_as_the_formula_says(tiny):
    _, model, split = tiny
    batch = norm_batch(split, 16, seed=5)
    w = 0.3
    g0 = grads_after_step(model, batch, 0.0)
    gw = grads_after_step(model, batch, w)

    ref = copy.deepcopy(model)
    _, z = ref(batch[0], return_features=True)
    reference_vc(z.float(), 1.0, 0.5).backward()  # d(v + ratio * c)/d(theta)
    checked = 0
    for name, p in ref.named_parameters():
        if p.grad is None:
            assert torch.equal(gw[name], g0[name]), name  # e.g. the head: VC does not reach it
            continue
        # fp32 cancellation in gw - g0 is relative to the CE gradient's size
        scale = g0[name].abs().max().item() + w * p.grad.abs().max().item()
        torch.testing.assert_close(gw[name] - g0[name], w * p.grad, rtol=1e-3, atol=1e-4 * scale)
        checked += 1
    assert checked > 10
    assert any(not torch.allclose(gw[n], g0[n]) for n in gw)


def test_alpha_sweep_endpoints_are_zero_shot_and_fine_tuned(tiny):
    _, model0, split = tiny
    theta_0 = state_dict_cpu(model0)
    tuned = copy.deepcopy(model0)
    opt = build_optimizer(tuned, lr=1e-3)
    for step in range(10):
        train_step(tuned, norm_batch(split, 32, seed=step), opt, vc_weight=0.0, vc_cov_ratio=0.125)
    theta_1 = state_dict_cpu(tuned)
    val = [norm_batch(split, 48, seed=100)]

    work = copy.deepcopy(model0)
    curve = alpha_sweep(theta_0, theta_1, work, lambda m: evaluate(m, val).acc,
                        [0.0, 0.25, 0.5, 0.75, 1.0])
    assert [a for a, _ in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve[0][1] == evaluate(model0, val).acc
    assert curve[-1][1] == evaluate(tuned, val).acc
    assert select_alpha(curve) in [a for a, _ in curve]


def test_select_alpha_ties_go_to_the_smaller_alpha():
    assert select_alpha([(0.0, 0.5), (0.5, 0.8), (1.0, 0.8)]) == 0.5
    assert select_alpha([(0.0, float("nan")), (1.0, 0.1)]) == 1.0
    with pytest.raises(ValueError):
        select_alpha([])


def test_one_se_rule_takes_the_smallest_alpha_the_split_cannot_tell_from_the_best():
    # 100 images, best 0.90 at alpha 1: SE = sqrt(0.9 * 0.1 / 100) = 0.03
    curve = [(0.0, 0.70), (0.5, 0.86), (0.6, 0.871), (0.8, 0.892), (1.0, 0.90)]
    assert select_alpha(curve, "argmax") == 1.0
    assert select_alpha(curve, "1se", n_val=100) == 0.6  # 0.871 >= 0.87; 0.86 is not
    # a larger split has a smaller SE (0.0095 on 1,000 images): only 0.8 and 1.0 qualify
    assert select_alpha(curve, "1se", n_val=1000) == 0.8
    # a perfect best has SE 0: the rule falls back to ties at the best
    assert select_alpha([(0.0, 0.9), (0.5, 1.0), (1.0, 1.0)], "1se", n_val=50) == 0.5
    with pytest.raises(ValueError, match="n_val"):
        select_alpha(curve, "1se")
    with pytest.raises(ValueError, match="rule"):
        select_alpha(curve, "median")


def test_knee_rule_stops_where_the_rise_flattens():
    # a saturating rise: rescaled, the lift above the diagonal is 0, .2, .4, .28, .12, 0 -> 0.4
    curve = [(0.0, 0.50), (0.2, 0.70), (0.4, 0.90), (0.6, 0.94), (0.8, 0.96), (1.0, 1.00)]
    assert select_alpha(curve, "knee") == 0.4
    assert select_alpha(curve, "argmax") == 1.0
    assert select_alpha(curve, "1se", n_val=153) == 1.0  # at 100 % the SE is 0: no slack at all
    # grid order does not matter, and the rescaling makes it invariant to the grid's range
    assert select_alpha(list(reversed(curve)), "knee") == 0.4
    assert select_alpha([(0.5 + a / 2, v) for a, v in curve], "knee") == 0.7
    # scale-free in accuracy: the same shape 10x flatter picks the same alpha
    assert select_alpha([(a, 0.9 + v / 10) for a, v in curve], "knee") == 0.4


def test_knee_rule_falls_back_to_argmax_without_a_knee():
    straight = [(0.0, 0.5), (0.5, 0.75), (1.0, 1.0)]
    convex = [(0.0, 0.5), (0.5, 0.55), (1.0, 1.0)]
    assert select_alpha(straight, "knee") == 1.0
    assert select_alpha(convex, "knee") == 1.0
    assert select_alpha([(0.0, 0.7), (0.5, 0.7), (1.0, 0.7)], "knee") == 0.0  # flat: argmax's tie
    assert select_alpha([(0.0, 0.9), (0.5, 0.6), (1.0, 0.3)], "knee") == 0.0  # fine-tuning hurt
    assert select_alpha([(0.5, 0.8)], "knee") == 0.5
    assert select_alpha([(0.0, 0.6), (0.5, float("nan")), (1.0, 0.9)], "knee") == 1.0


def test_bf16_autocast_step_on_cpu(tiny):
    _, model0, split = tiny
    model = copy.deepcopy(model0)
    opt = build_optimizer(model, lr=1e-4)
    out = train_step(model, norm_batch(split, 8, seed=1), opt, vc_weight=0.16, vc_cov_ratio=0.125,
                     autocast_dtype=torch.bfloat16)
    assert torch.isfinite(out["loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights


def test_evalset_is_lazy_and_caches(tiny):
    _, model, split = tiny
    reads = []

    class Counting(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            reads.append(i)
            x, y = colour_batch(1, seed=i)
            return x[0], int(y[0])

    es = EvalSet(Counting(), indices=range(1, 10, 2), batch_size=4)
    assert reads == [] and len(es) == 5
    r1 = evaluate(model, es.batches("cpu", split.mean, split.std))
    r2 = evaluate(model, es.batches("cpu", split.mean, split.std))
    assert sorted(reads) == [1, 3, 5, 7, 9]  # read once, only this rank's share
    assert r1.total == r2.total == 5 and r1.correct == r2.correct
    assert r1.features.shape == (5, 64)
