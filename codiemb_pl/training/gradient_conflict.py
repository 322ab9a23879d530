"""How much two task gradients agree (SPEC §10, gradient conflict): cosine and norm ratio, overall and per layer group.

For gradients g_1, g_2 (e.g. g_IR and g_STS on fixed probe batches at the same weights) the Gram entries

    g_11 = ‖g_1‖²,   g_22 = ‖g_2‖²,   g_12 = g_1·g_2

give  cos(g_1, g_2) = g_12 / √(g_11·g_22)  (negative: the tasks pull apart; 0 when either gradient is zero) and the
norm ratio ‖g_1‖ / ‖g_2‖ (inf when only g_2 is zero, nan when both are). Each dot product is summed in blocks of
`DOT_BLOCK` elements in the gradients' own float32 (one batched BLAS call, no float64 copy of the gradient) and the
block sums are added in float64 (relative error ~1e-7, against ~1e-4 for one float32 dot over a 10M-element
embedding matrix); float64 gradients stay float64, half precision is widened to float32 first. Per layer group
(`layer_group`): the token / position embeddings, each transformer block, and the rest (pooler, final norm,
projection head), each with its own Gram entries over that group's parameters only.
Plain tensors: the Lightning side (probe batches, when to measure) is `training/conflict_probe.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

EMBEDDINGS, HEAD = "embeddings", "head"
DOT_BLOCK = 4096   # elements per float32 partial sum of a dot product (`blocked_dot`)
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")
_EMBEDDING_NAMES = re.compile(r"embeddings\.|embed_tokens\.|embed_positions\.|(^|\.)(wte|wpe)\.")


@dataclass(frozen=True)
class GradientGram:
    """The Gram entries of two gradients: g_11 = ‖g_1‖², g_22 = ‖g_2‖², g_12 = g_1·g_2 (floats)."""

    g11: float
    g22: float
    g12: float

    @property
    def cosine(self) -> float:
        """g_12 / √(g_11·g_22); 0 when either gradient is zero."""
        denominator = math.sqrt(self.g11 * self.g22)
        return self.g12 / denominator if denominator > 0 else 0.0

    @property
    def norm_ratio(self) -> float:
        """‖g_1‖ / ‖g_2‖ (inf when only g_2 is zero, nan when both are)."""
        if self.g22 > 0:
            return math.sqrt(self.g11 / self.g22)
        return math.inf if self.g11 > 0 else math.nan

    def __add__(self, other: "GradientGram") -> "GradientGram":
        return GradientGram(self.g11 + other.g11, self.g22 + other.g22, self.g12 + other.g12)


ZERO_GRAM = GradientGram(0.0, 0.0, 0.0)


def blocked_dot(x: Tensor, y: Tensor) -> Tensor:
    """x·y of two flat tensors of one dtype (float32 or float64) as a float64 scalar: block sums of `DOT_BLOCK`
    elements in that dtype (one `bmm`), added in float64; the tail (< one block) in float64."""
    full = x.numel() // DOT_BLOCK * DOT_BLOCK
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if full:
        blocks = torch.bmm(x[:full].view(-1, 1, DOT_BLOCK), y[:full].view(-1, DOT_BLOCK, 1))
        total = total + blocks.sum(dtype=torch.float64)
    if x.numel() > full:
        total = total + x[full:].to(torch.float64).dot(y[full:].to(torch.float64))
    return total


def _flat(tensor: Optional[Tensor]) -> Optional[Tensor]:
    if tensor is None:
        return None
    flat = tensor.detach().reshape(-1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def gram_terms(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """[a·a, b·b, a·b] of two tensors of one parameter (None = zero) as a float64 tensor on their device
    (`blocked_dot`); None when both are None."""
    if a is None and b is None:
        return None
    a1, b1 = _flat(a), _flat(b)
    if a1 is not None and b1 is not None and a1.dtype != b1.dtype:
        a1, b1 = a1.to(torch.float64), b1.to(torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=(a1 if a1 is not None else b1).device)
    return torch.stack([blocked_dot(a1, a1) if a1 is not None else zero,
                        blocked_dot(b1, b1) if b1 is not None else zero,
                        blocked_dot(a1, b1) if a1 is not None and b1 is not None else zero])


def summed_gram(terms: Sequence[Optional[Tensor]]) -> GradientGram:
    """The `GradientGram` of the sum of `gram_terms` results (one host transfer per device)."""
    per_device: dict[torch.device, Tensor] = {}
    for term in terms:
        if term is not None:
            per_device[term.device] = per_device[term.device] + term if term.device in per_device else term
    total = sum((value.cpu() for value in per_device.values()), torch.zeros(3, dtype=torch.float64))
    return GradientGram(*(float(value) for value in total))


def gram_of(first: Sequence[Optional[Tensor]], second: Sequence[Optional[Tensor]]) -> GradientGram:
    """The Gram entries of two gradients given as matching lists of tensors (one per parameter; None = zero), as if
    each list were flattened into one vector."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} tensors against {len(second)}")
    return summed_gram([gram_terms(a, b) for a, b in zip(first, second)])


def layer_group(name: str) -> str:
    """The layer group of a parameter name: `block_<i>` for a transformer block's parameter (the first `.<i>.` in the
    name: BERT `encoder.layer.<i>.`, decoder `layers.<i>.`, GPT-2 `h.<i>.`), `embeddings` for token / position
    embeddings, `head` for everything else (pooler, final norm, projection)."""
    match = _BLOCK_INDEX.search(name)
    if match:
        return f"block_{int(match.group(1)):02d}"
    return EMBEDDINGS if _EMBEDDING_NAMES.search(name) else HEAD


def group_order(groups: Sequence[str]) -> list[str]:
    """Groups in model order: embeddings, the blocks by index, head."""
    unique = set(groups)
    blocks = sorted(group for group in unique if group.startswith("block_"))
    return [group for group in (EMBEDDINGS, *blocks, HEAD) if group in unique]


def conflict_metrics(names: Sequence[str], first: Sequence[Optional[Tensor]],
                     second: Sequence[Optional[Tensor]]) -> dict[str, float]:
    """`cosine` and `norm_ratio` of the two gradients (one tensor per parameter of `names`), overall and as
    `<group>/cosine`, `<group>/norm_ratio` per `layer_group`; also `norm_first`, `norm_second` (overall norms)."""
    if not len(names) == len(first) == len(second):
        raise ValueError(f"{len(names)} names, {len(first)} and {len(second)} tensors")
    terms: dict[str, list[Optional[Tensor]]] = {}
    for name, a, b in zip(names, first, second):
        terms.setdefault(layer_group(name), []).append(gram_terms(a, b))
    per_group = {group: summed_gram(group_terms) for group, group_terms in terms.items()}
    overall = sum(per_group.values(), ZERO_GRAM)
    metrics = {"cosine": overall.cosine, "norm_ratio": overall.norm_ratio,
               "norm_first": math.sqrt(overall.g11), "norm_second": math.sqrt(overall.g22)}
    for group in group_order(list(per_group)):
        metrics[f"{group}/cosine"] = per_group[group].cosine
        metrics[f"{group}/norm_ratio"] = per_group[group].norm_ratio
    return metrics
