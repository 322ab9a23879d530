"""Cross-device gathering of candidate embeddings (SPEC §3), identity when not distributed.

Every rank must pass a tensor of the same shape: the collectives below concatenate equal-sized
blocks in rank order, so rank r's rows land at ``[r * n, (r + 1) * n)`` of the result. The
sampler guarantees this (every rank runs the same task with the same per-device batch size).

Gradient contract of ``gather_with_grad``: the backward pass sums, over all ranks, the gradient
each rank's loss sends to this rank's block. With DDP averaging parameter gradients afterwards,
``mean_r dL_r/dθ`` is exactly the gradient of the global loss ``mean_r L_r``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: concatenate every rank's block. Backward: sum the incoming gradient over ranks
    (all-reduce, which every backend supports) and return this rank's block of the sum."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world_size = rank_and_world()
        ctx.rank, ctx.block_rows = rank, x.shape[0]
        blocks = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(blocks, x)
        return torch.cat(blocks, dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        summed = grad_output.contiguous().clone()
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.block_rows
        return summed[start:start + ctx.block_rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` along dim 0 from every rank (rank order), keeping the autograd graph.

    Returns ``x`` itself when torch.distributed is unavailable, not initialised or has one rank.
    """
    _, world_size = rank_and_world()
    if world_size == 1:
        return x
    return _AllGatherWithGrad.apply(x.contiguous())


@torch.no_grad()
def gather_no_grad(x: Tensor | None) -> Tensor | None:
    """All-gather ``x`` along dim 0 without gradient (for id tensors and masks).

    Identity when not distributed; ``None`` passes through (optional batch fields).
    """
    _, world_size = rank_and_world()
    if x is None or world_size == 1:
        return x
    x = x.contiguous()
    blocks = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(blocks, x)
    return torch.cat(blocks, dim=0)
