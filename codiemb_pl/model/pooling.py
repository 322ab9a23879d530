"""Pooling token states `H[b, t, d]` into one vector per text, guided by a 0/1 mask `M[b, t]`.

The mask is normally the attention mask; a caller may pass a narrower one so that tokens are attended to
but not pooled. Both right and left padding work because positions are found from the mask, never assumed.

Instruction prefixes (SPEC §1: "with mean pooling the prefix tokens are excluded from the mean but still
attended to"): for a text `prefix + text`, the tokens of `prefix` (counted by tokenising the prefix alone,
`prefix_token_count`) and the tokenizer's leading special tokens before them (`[CLS]`,
`leading_special_tokens`) get `pooling_mask = 0` (`prefix_pooling_mask`); `attention_mask` keeps them. This
is sentence-transformers' `Pooling(include_prompt=False)` rule for a prompt, so a training instruction
exported as a prompt (`callbacks.export.training_prompts`) gives `SentenceTransformer(folder).encode(q,
prompt_name=...)` exactly the training embedding. Training batches (`data.collate`, the token cache),
validation and every evaluation path (`TextEncoder.encode(prefix=...)` and `encode(prompt=...)`) use this
one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

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


def leading_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (1 for BERT's [CLS], 0 for most decoders)."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return start
    return 0


@lru_cache(maxsize=4096)
def prefix_token_count(tokenizer, prefix: str) -> int:
    """Tokens `prefix` occupies on its own (no special tokens)."""
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0


def prefix_pooling_mask(attention_mask: Tensor, prefix_tokens: Sequence[int], leading: int) -> Tensor:
    """Copy of `attention_mask` `[b, t]` with each row's prefix tokens (and the leading special tokens before
    them) set to 0, i.e. left out of pooling.

    Row i's real tokens start at `s_i` (its first `M[i,t] = 1`, so left padding works) and number `r_i`;
    its prefix covers positions `[s_i + leading, s_i + leading + prefix_tokens[i])`. Zeroed:
    `[s_i, min(s_i + leading + prefix_tokens[i], s_i + r_i - 1))` (sentence-transformers' rule), so a text
    truncated inside its prefix keeps its last real token. Rows with `prefix_tokens[i] = 0` are unchanged.
    """
    mask = attention_mask.clone()
    counts = torch.as_tensor(list(prefix_tokens), dtype=torch.long, device=mask.device).unsqueeze(1)
    first = mask.to(torch.int32).argmax(dim=1, keepdim=True).long()
    real = mask.sum(dim=1, keepdim=True).long()
    stop = torch.minimum(first + leading + counts, first + real - 1)
    stop = torch.where(counts > 0, stop, first)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask.masked_fill((positions >= first) & (positions < stop), 0)
