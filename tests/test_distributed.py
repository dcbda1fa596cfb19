"""Global VC statistics under data parallelism: 2 Ray Train workers (gloo, DDP) on halves of a
batch give the loss and the gradient of 1 process on the whole batch."""
import os
import sys

import numpy as np
import pytest
import torch

from regft.distributed import all_reduce_sum, gather_features, gather_rows, rank_and_world
from regft.engine import build_optimizer, normalize_uint8, split_clip_transform, train_step
from regft.models import build_classifier, create_clip
from regft.tasks import Task

TASK = Task(name="colours", classnames=("red", "green", "blue", "yellow"))
GLOBAL_BATCH = 16
VC_WEIGHT, VC_RATIO = 0.3, 0.5


def global_batch():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (GLOBAL_BATCH, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, len(TASK.classnames), (GLOBAL_BATCH,), generator=g)
    return x, y


def one_step(model, x, y, gather_fn):
    """One CE + VC step at lr 0; returns (step terms as floats, {param name: grad})."""
    bundle_split = split_clip_transform(create_clip("tiny", None, seed=0).preprocess_eval)
    images = normalize_uint8(x, bundle_split.mean, bundle_split.std)
    opt = build_optimizer(model, lr=0.0)
    out = train_step(model, (images, y), opt, vc_weight=VC_WEIGHT, vc_cov_ratio=VC_RATIO,
                     grad_clip=0.0, gather_fn=gather_fn)
    module = model.module if hasattr(model, "module") else model
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters()}
    return {k: float(v) for k, v in out.items()}, grads


def fresh_model():
    return build_classifier(create_clip("tiny", None, seed=0), TASK)


def ddp_worker(config):
    import ray.train
    import ray.train.torch

    rank, world = rank_and_world()
    x, y = global_batch()
    per = GLOBAL_BATCH // world
    rows = slice(rank * per, (rank + 1) * per)
    model = ray.train.torch.prepare_model(fresh_model())
    terms, grads = one_step(model, x[rows], y[rows], gather_features)
    ce_global = all_reduce_sum([terms["ce_loss"]])[0] / world
    # VC on this rank's rows only (the paper code's per-device statistics), for contrast
    _, local_grads = one_step(ray.train.torch.prepare_model(fresh_model()), x[rows], y[rows], None)
    rows_all = gather_rows(torch.arange(per) + rank * per)
    torch.save({"terms": terms, "ce_global": ce_global, "grads": grads, "local_grads": local_grads,
                "world": world, "rows_all": rows_all},
               os.path.join(config["out"], f"rank{rank}.pt"))
    ray.train.report({"done": 1})


def test_not_distributed_helpers_are_local():
    z = torch.randn(4, 3)
    assert gather_features(z) is z
    assert gather_rows(z) is z
    assert rank_and_world() == (0, 1)
    assert all_reduce_sum([1.0, 2.5]) == [1.0, 2.5]


@pytest.mark.timeout(240)
def test_two_workers_equal_one_worker_on_the_global_batch(ray_local, tmp_path):
    import ray.cloudpickle
    import ray.train
    from ray.train.torch import TorchTrainer

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    out = tmp_path / "ranks"
    out.mkdir()
    trainer = TorchTrainer(
        ddp_worker,
        train_loop_config={"out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, use_gpu=False),
        run_config=ray.train.RunConfig(name="ddp-equivalence", storage_path=str(tmp_path / "runs")),
    )
    trainer.fit()

    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["rows_all"].tolist() == list(range(GLOBAL_BATCH))

    x, y = global_batch()
    ref_terms, ref_grads = one_step(fresh_model(), x, y, None)  # 1 process, whole batch

    for r in ranks:  # same first-step loss
        assert r["ce_global"] == pytest.approx(ref_terms["ce_loss"], rel=1e-5)
        assert r["terms"]["vc_loss"] == pytest.approx(ref_terms["vc_loss"], rel=1e-5)
        assert r["terms"]["vc_variance"] == pytest.approx(ref_terms["vc_variance"], rel=1e-5)
        assert r["terms"]["vc_covariance"] == pytest.approx(ref_terms["vc_covariance"], rel=1e-5)
        for name, g in ref_grads.items():  # and the same gradient after DDP's averaging
            scale = g.abs().max().item() + 1e-12
            torch.testing.assert_close(r["grads"][name], g, rtol=1e-4, atol=1e-5 * scale,
                                       msg=lambda m, n=name: f"{n}: {m}")

    # per-device VC statistics would give a different gradient: the check above has teeth
    diffs = [np.abs((ranks[0]["local_grads"][n] - g).numpy()).max() / (g.abs().max().item() + 1e-12)
             for n, g in ref_grads.items()]
    assert max(diffs) > 1e-2
