"""torch.distributed helpers for the training loop. Pure ring: plain torch, no Ray, no files.

Everything here is the identity (or a local computation) when torch.distributed is not
initialised, so the same engine code runs in a single process, in a unit test and in a Ray Train
worker group (gloo on CPU, NCCL on GPU).

VC statistics are global (see regft.losses): `gather_features` concatenates the embeddings of
every rank, differentiably. Gradient semantics, which the 2-worker test checks against 1 worker:

- every rank computes the *same* VC value from the gathered (B_global, d) matrix, plus a CE on
  its own rows; DDP then averages parameter gradients over the W ranks;
- so the gradient reaching rank r's rows must be the *sum* over ranks of d(VC_s)/d(z_r)
  = W * d(VC)/d(z_r); after DDP's division by W this is exactly d(VC)/d(theta) of one worker
  holding the global batch. `_GatherWithGrad.backward` therefore all-reduces (SUM) the incoming
  gradient and keeps its own slice. (torch.distributed.nn.functional.all_gather has the same
  semantics but is deprecated and emulates reduce-scatter with all-to-all under gloo.)
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_equal_rows(n: int, device: torch.device) -> None:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([n], dtype=torch.long, device=device))
    got = [int(s.item()) for s in sizes]
    if len(set(got)) != 1:
        raise RuntimeError(
            f"gather_features needs the same batch size on every rank, got {got} "
            "(drop incomplete batches: drop_last=True)"
        )


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor)
        ctx.rank, ctx.rows = rank, tensor.shape[0]
        return torch.cat(parts, dim=0)  # (W * B, d), rank order

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # sum of every rank's d(loss_s)/d(z)
        start = ctx.rank * ctx.rows
        return grad[start:start + ctx.rows]


def gather_features(z: torch.Tensor, check_sizes: bool = True) -> torch.Tensor:
    """(B, d) local embeddings -> (W*B, d) embeddings of all ranks, in rank order.

    Differentiable when z requires grad (see the module docstring for the gradient semantics);
    the identity outside distributed training. All ranks must pass the same B.
    """
    if not is_distributed():
        return z
    if check_sizes:
        _check_equal_rows(z.shape[0], z.device)
    if z.requires_grad:
        return _GatherWithGrad.apply(z)
    parts = [torch.empty_like(z) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, z.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device | str = "cpu"):
    """Sum a list of floats (or a float64 tensor) over ranks; a local copy when not distributed."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device).clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist() if not isinstance(values, torch.Tensor) else t


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (n_r, ...) tensors of all ranks (n_r may differ), no gradient. For eval
    features; every rank gets the full result, in rank order."""
    if not is_distributed():
        return x
    x = x.contiguous()
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    biggest = max(sizes)
    padded = x.new_zeros((biggest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)

