"""Pooling token states `H[b, t, d]` into one vector per text, guided by a 0/1 mask `M[b, t]`.

The mask is normally the attention mask; a caller may pass a narrower one (e.g. with instruction
tokens zeroed, SPEC §1) so that tokens are attended to but not pooled. Both right and left padding
work because positions are found from the mask, never assumed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from codiemb_pl.errors import InputError


def mean_pool(token_embeddings: Tensor, mask: Tensor) -> Tensor:
    """`e_i = Σ_t M[i,t]·H[i,t] / max(Σ_t M[i,t], 1e-9)` (accumulated in float32 for half precision)."""
    half_precision = token_embeddings.dtype in (torch.float16, torch.bfloat16)
    accumulate_dtype = torch.float32 if half_precision else token_embeddings.dtype
    weights = mask.unsqueeze(-1).to(accumulate_dtype)
    summed = (token_embeddings.to(accumulate_dtype) * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    return (summed / counts).to(token_embeddings.dtype)


def cls_pool(token_embeddings: Tensor, mask: Tensor) -> Tensor:
    """`e_i = H[i, t0]` with `t0` the first position where `M[i,t] = 1` (position 0 under right padding)."""
    first_index = mask.to(torch.int32).argmax(dim=1)
    return _take_position(token_embeddings, first_index)


def last_token_pool(token_embeddings: Tensor, mask: Tensor) -> Tensor:
    """`e_i = H[i, t1]` with `t1 = max{t : M[i,t] = 1}` (the last real token, whichever side is padded).

    A row with an all-zero mask falls back to the last position.
    """
    sequence_length = mask.shape[1]
    positions = torch.arange(sequence_length, device=mask.device).unsqueeze(0)
    masked_positions = torch.where(mask.bool(), positions, torch.full_like(positions, -1))
    last_index = masked_positions.max(dim=1).values
    last_index = torch.where(last_index < 0, torch.full_like(last_index, sequence_length - 1), last_index)
    return _take_position(token_embeddings, last_index)


def _take_position(token_embeddings: Tensor, index: Tensor) -> Tensor:
    """Row-wise gather: `out[i] = H[i, index[i]]`."""
    rows = torch.arange(token_embeddings.shape[0], device=token_embeddings.device)
    return token_embeddings[rows, index.to(torch.long)]


POOLING_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean": mean_pool,
    "cls": cls_pool,
    "last": last_token_pool,
}
POOLING_MODES: tuple[str, ...] = tuple(POOLING_FUNCTIONS)


def check_pooling_mode(mode: str, where: str = "pooling") -> str:
    """Return `mode` if it is a known pooling mode, else raise `InputError` listing the valid ones."""
    if mode not in POOLING_FUNCTIONS:
        raise InputError(where, f"unknown pooling mode {mode!r}",
                         f"use one of: {', '.join(POOLING_MODES)}")
    return mode


def pool(token_embeddings: Tensor, mask: Tensor, mode: str) -> Tensor:
    """Apply the pooling named `mode` (`mean`, `cls` or `last`): `[b, t, d], [b, t] -> [b, d]`."""
    return POOLING_FUNCTIONS[check_pooling_mode(mode)](token_embeddings, mask)


def exclude_leading_tokens(mask: Tensor, count: int) -> Tensor:
    """Copy of `mask` with each row's first `count` real tokens set to 0 (e.g. an instruction prefix).

    Padding on the left is skipped: the zeroed span starts at each row's first `M[i,t] = 1`.
    """
    if count <= 0:
        return mask.clone()
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    first_index = mask.to(torch.int32).argmax(dim=1, keepdim=True)
    return torch.where(positions < first_index + count, torch.zeros_like(mask), mask)
