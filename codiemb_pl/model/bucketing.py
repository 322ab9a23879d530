"""Length-bucketed encoding of one padded text group: same embeddings, less padding.

Rows are sorted by length, cut into `buckets` contiguous groups, each group is trimmed to its own
longest row and encoded separately, and the embeddings are put back in the original order. With a
padding-aware encoder (attention and pooling masks) the result equals encoding the whole group at once
up to floating-point rounding; only the wasted compute on padding changes. Gradients flow through.
"""

from __future__ import annotations

from typing import Callable

import torch

Encode = Callable[[dict[str, torch.Tensor]], torch.Tensor | tuple[torch.Tensor, ...]]


def trim_features(features: dict[str, torch.Tensor], rows: torch.Tensor, length: int,
                  left_padded: bool) -> dict[str, torch.Tensor]:
    """Select `rows` and cut every [batch, seq] tensor to `length` columns (from the padded side)."""
    trimmed = {}
    for key, value in features.items():
        value = value.index_select(0, rows)
        if value.dim() >= 2:
            value = value[:, -length:] if left_padded else value[:, :length]
        trimmed[key] = value
    return trimmed


def encode_in_length_buckets(encode: Encode, features: dict[str, torch.Tensor], buckets: int,
                             left_padded: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Encode `features` in up to `buckets` length-sorted groups and restore the input order."""
    mask = features["attention_mask"]
    batch = mask.shape[0]
    if buckets <= 1 or batch < 2:
        return encode(features)
    lengths = mask.sum(dim=1)
    order = torch.argsort(lengths, stable=True)
    outputs: list = []
    for rows in torch.tensor_split(order, min(buckets, batch)):
        if rows.numel() == 0:
            continue
        length = int(lengths[rows].max())
        outputs.append(encode(trim_features(features, rows, length, left_padded)))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch, device=order.device)
    if isinstance(outputs[0], tuple):
        return tuple(torch.cat([out[i] for out in outputs])[inverse] for i in range(len(outputs[0])))
    return torch.cat(outputs)[inverse]
