"""Padding-free batches: a step's texts packed into unpadded rows, with per-text positions and attention blocks.

The padded path runs `[b, L]` (every text padded to the longest, L) per text group, so the linear layers spend
FLOPs on b·L tokens and attention on b·L² pairs. Packing lays the n real token sequences (lengths s_i) end to end
in R rows of width W (first-fit decreasing), gives every text its own position ids 0..s_i−1 and a block-diagonal
attention mask (block-causal for decoders), so each token attends to its own text only and sees the positions it
sees unpadded: the same embeddings up to floating-point rounding, with Σ s_i ≤ R·W tokens of linear work.

- `sdpa` / `eager` attention (CPU, or GPU without flash-attention): rows of width W = the longest text, a dense
  `[R, 1, W, W]` mask; attention costs R·W² pairs (≤ b·L² of the padded path, as R ≤ b).
- `flash_attention_2/3` (GPU, where installed): one row of all tokens and no mask; transformers derives the varlen
  boundaries from the restarting position ids, so attention costs Σ s_i² pairs.

`packing_pays` is the per-step rule (`model.padding_free: auto`), a FLOP count per forward,
`F(rows, width) = rows · (2·N·width + 4·layers·hidden·width²)` (N = non-embedding parameters): pack when the
packed forward costs at most `PACKING_MARGIN` of the padded forwards it replaces (the margin pays for building the
mask and gathering the pooled tokens back); with flash-attention packing always pays.
Backbones whose positions are known to restart at 0 per text are packed (`PACKABLE_MODEL_TYPES`): BERT (absolute
positions 0..s−1) and the rotary decoders tested (relative positions, so a text's shift does not matter).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from codiemb_pl.model.pooling import pool

#: model_type -> how positions restart per text: every one listed here takes position ids 0..s−1 per text.
PACKABLE_MODEL_TYPES = ("bert", "qwen2", "llama")
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
#: pack when the packed forward's FLOPs are at most this share of the padded forwards' (see the module docstring)
PACKING_MARGIN = 0.85
PADDING_FREE_MODES = ("auto", True, False)
POOLING_MASK_KEY = "pooling_mask"


@dataclass
class PackedTexts:
    """n texts packed into `[R, W]` rows: the transformer's inputs and where each text's tokens landed.

    `inputs`: input_ids, position_ids, (token_type_ids), and `attention_mask` `[R, 1, W, W]` unless flash varlen;
    `gather`: `[n, S]` flat positions (into the R·W packed tokens) of each text's tokens, S = the longest text,
    R·W (a zero row) where a text is shorter; `token_mask` / `pooling_mask`: `[n, S]` 0/1 in that frame.
    """

    inputs: dict[str, Tensor]
    gather: Tensor
    token_mask: Tensor
    pooling_mask: Tensor

    @property
    def rows(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    @property
    def width(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    def unpack(self, states: Tensor) -> Tensor:
        """`[R, W, d]` packed token states -> `[n, S, d]` per text, right-padded with zeros (differentiable)."""
        flat = states.reshape(-1, states.shape[-1])
        flat = torch.cat([flat, flat.new_zeros(1, flat.shape[-1])])
        return flat[self.gather]

    def pool(self, states: Tensor, mode: str) -> Tensor:
        """`model.pooling.pool` of every text's own tokens: mean over its pooling mask, `cls` / `last` over its
        tokens, exactly as on the padded batch."""
        mask = self.pooling_mask if mode == "mean" else self.token_mask
        return pool(self.unpack(states), mask, mode)


def first_fit_decreasing(lengths: Sequence[int], width: int) -> tuple[list[int], list[int]]:
    """(row, offset) of each length when packed into rows of `width`: longest first, each into the first row
    with room (a length over `width` gets a row of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[int] = []
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    for i in order:
        for row, room in enumerate(free):
            if room >= lengths[i]:
                break
        else:
            row = len(free)
            free.append(width)
        row_of[i], offset_of[i] = row, width - free[row]
        free[row] -= lengths[i]
    return row_of, offset_of


def pack_features(groups: Sequence[dict[str, Tensor]], pad_token_id: int, *, causal: bool, varlen: bool,
                  mask_dtype: Optional[torch.dtype] = None) -> PackedTexts:
    """Pack the real tokens of every padded text group in `groups` (right or left padded) into one `PackedTexts`,
    texts in group order. `causal`: block-causal attention (decoders); `varlen`: one row and no mask (flash
    attention); `mask_dtype`: None for a boolean mask (sdpa), else an additive mask of that dtype (eager)."""
    masks = [group["attention_mask"].bool() for group in groups]
    device = masks[0].device
    lengths = torch.cat([mask.sum(dim=1) for mask in masks])
    flat_ids = torch.cat([group["input_ids"][mask] for group, mask in zip(groups, masks)])
    flat_pool = torch.cat([group.get(POOLING_MASK_KEY, group["attention_mask"])[mask]
                           for group, mask in zip(groups, masks)])
    with_types = all("token_type_ids" in group for group in groups)
    length_list = lengths.tolist()
    total, longest = int(lengths.sum()), max(length_list)
    width = total if varlen else longest
    row_list, offset_list = first_fit_decreasing(length_list, width)
    rows = max(row_list) + 1
    starts = torch.tensor(row_list, device=device) * width + torch.tensor(offset_list, device=device)
    text_of_token = torch.repeat_interleave(torch.arange(len(length_list), device=device), lengths)
    first_token = torch.cumsum(lengths, 0) - lengths
    within = torch.arange(total, device=device) - first_token[text_of_token]
    target = starts[text_of_token] + within

    input_ids = torch.full((rows * width,), pad_token_id, dtype=flat_ids.dtype, device=device)
    input_ids[target] = flat_ids
    positions = torch.zeros(rows * width, dtype=torch.long, device=device)
    positions[target] = within
    inputs = {"input_ids": input_ids.view(rows, width), "position_ids": positions.view(rows, width)}
    if with_types:
        types = torch.zeros(rows * width, dtype=groups[0]["token_type_ids"].dtype, device=device)
        types[target] = torch.cat([group["token_type_ids"][mask] for group, mask in zip(groups, masks)])
        inputs["token_type_ids"] = types.view(rows, width)
    if not varlen:
        # each padding slot is a block of its own (attends to itself: no all-masked query row, no NaN)
        segment = torch.arange(rows * width, device=device) + len(length_list)
        segment[target] = text_of_token
        segment = segment.view(rows, width)
        allowed = segment.unsqueeze(2) == segment.unsqueeze(1)
        if causal:
            allowed = allowed & torch.ones(width, width, dtype=torch.bool, device=device).tril()
        allowed = allowed.unsqueeze(1)
        if mask_dtype is not None:
            allowed = torch.zeros(allowed.shape, dtype=mask_dtype, device=device).masked_fill(
                ~allowed, torch.finfo(mask_dtype).min)
        inputs["attention_mask"] = allowed

    count = len(length_list)
    frame = torch.arange(longest, device=device).unsqueeze(0)
    token_mask = (frame < lengths.unsqueeze(1)).long()
    gather = torch.full((count, longest), rows * width, dtype=torch.long, device=device)
    gather[token_mask.bool()] = target
    pooling_mask = torch.zeros(count, longest, dtype=token_mask.dtype, device=device)
    pooling_mask[token_mask.bool()] = flat_pool.to(token_mask.dtype)
    return PackedTexts(inputs, gather, token_mask, pooling_mask)


def forward_cost(rows: int, width: int, parameters: int, layers: int, hidden: int) -> float:
    """FLOPs of one forward over `[rows, width]`: rows·(2·N·width + 4·layers·hidden·width²)."""
    return rows * (2.0 * parameters * width + 4.0 * layers * hidden * width * width)


def bucketed_widths(lengths: Sequence[int], buckets: int) -> list[tuple[int, int]]:
    """(rows, width) of the forwards `model.bucketing.encode_in_length_buckets` runs for one group's lengths."""
    if buckets <= 1 or len(lengths) < 2:
        return [(len(lengths), max(lengths))]
    ordered = sorted(lengths)
    parts = torch.tensor_split(torch.tensor(ordered), min(buckets, len(ordered)))
    return [(len(part), int(part.max())) for part in parts if len(part)]


def packing_pays(group_lengths: Sequence[Sequence[int]], buckets: int, parameters: int, layers: int, hidden: int,
                 varlen: bool) -> bool:
    """The per-step rule of `padding_free: auto` (module docstring): packed FLOPs ≤ `PACKING_MARGIN` × padded."""
    if varlen:
        return True
    padded = sum(forward_cost(rows, width, parameters, layers, hidden)
                 for lengths in group_lengths if len(lengths) for rows, width in bucketed_widths(lengths, buckets))
    every = [length for lengths in group_lengths for length in lengths]
    rows_used = max(first_fit_decreasing(every, max(every))[0]) + 1
    return forward_cost(rows_used, max(every), parameters, layers, hidden) <= PACKING_MARGIN * padded
