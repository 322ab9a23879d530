"""`StepEmbedder`: how a training step's text groups reach the encoder (padded, bucketed, packed, merged).

`embed_fn` of the objectives (`losses.objectives`): `embedder(features, return_middle)` embeds one padded text
group, `embedder.embed_groups({name: features}, return_middle)` every group of a step. `padding_free`:

- `False`: each group on its own, padded, in `length_buckets` length-sorted forwards (`model.bucketing`): the
  numbers of every run before this setting existed;
- `True`: the step's groups packed into one padding-free forward (`TextEncoder.forward_packed`);
- `"auto"`: packed when `model.packing.packing_pays` (FLOPs of the packed rows ≤ 0.85 × those of the padded
  forwards), else padded, groups of one padded width merged into one forward (no extra padding, fewer calls).

Packing and merging change the layout of a forward, so dropout draws its masks in another order: the same
function, other random draws (with dropout off, the same embeddings up to rounding).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from codiemb_pl.errors import InputError
from codiemb_pl.model.bucketing import encode_in_length_buckets
from codiemb_pl.model.encoder import POOLING_MASK_KEY, TextEncoder
from codiemb_pl.model.packing import PADDING_FREE_MODES, packing_pays

Features = dict[str, Tensor]
Embedding = Union[Tensor, tuple[Tensor, Tensor]]


def check_padding_free(setting: object, encoder: TextEncoder) -> Union[bool, str]:
    """`model.padding_free` as True, False or "auto"; True on a backbone that cannot be packed is refused."""
    value = {"true": True, "false": False}.get(setting, setting) if isinstance(setting, str) else setting
    if value not in PADDING_FREE_MODES:
        raise InputError("model.padding_free", f"unknown setting {setting!r}", "use auto, true or false")
    if value is True and not encoder.can_pack():
        model_type = getattr(encoder.model.config, "model_type", "?")
        raise InputError("model.padding_free", f"a {model_type} backbone with {encoder.attention_implementation} "
                         "attention cannot be packed (packing knows bert, qwen2 and llama position ids)",
                         "set model.padding_free: auto (packs only where it can) or false")
    return value


def merge_groups(groups: list[Features]) -> Features:
    """Row-wise concatenation of groups of one padded width (a missing pooling mask is the attention mask)."""
    keys = set().union(*groups)
    merged = {}
    for key in keys:
        parts = [group.get(key, group["attention_mask"]) if key == POOLING_MASK_KEY else group[key] for group in groups]
        merged[key] = torch.cat(parts)
    return merged


class StepEmbedder:
    """The objectives' `embed_fn` (module docstring)."""

    def __init__(self, encoder: TextEncoder, length_buckets: int = 1, padding_free: Union[bool, str] = False):
        self.encoder = encoder
        self.length_buckets = length_buckets
        self.padding_free = check_padding_free(padding_free, encoder)
        self._dimensions: Optional[tuple[int, int, int]] = None

    def __call__(self, features: Features, return_middle: bool = False) -> Embedding:
        if self.packs([features]):
            return self.encoder.forward_packed([features], return_middle)[0]
        return self.padded(features, return_middle)

    def padded(self, features: Features, return_middle: bool = False) -> Embedding:
        left = getattr(self.encoder.tokenizer, "padding_side", "right") == "left"
        return encode_in_length_buckets(lambda f: self.encoder(f, return_middle=return_middle), features,
                                        self.length_buckets, left_padded=left)

    def embed_groups(self, groups: dict[str, Features], return_middle: bool = False) -> dict[str, Embedding]:
        """Every group of a step: one packed forward, merged padded forwards ("auto"), or one per group."""
        names, features = list(groups), list(groups.values())
        if self.packs(features):
            return dict(zip(names, self.encoder.forward_packed(features, return_middle)))
        if self.padding_free != "auto" or self.length_buckets > 1:
            return {name: self.padded(group, return_middle) for name, group in groups.items()}
        results: dict[str, Embedding] = {}
        for width in dict.fromkeys(group["input_ids"].shape[1] for group in features):
            same = [name for name in names if groups[name]["input_ids"].shape[1] == width]
            output = self.encoder(merge_groups([groups[name] for name in same]), return_middle=return_middle)
            start = 0
            for name in same:
                rows = slice(start, start + groups[name]["input_ids"].shape[0])
                start = rows.stop
                results[name] = tuple(part[rows] for part in output) if return_middle else output[rows]
        return {name: results[name] for name in names}

    def packs(self, groups: list[Features]) -> bool:
        """Whether this forward runs packed: always with True, never with False, by `packing_pays` with "auto"."""
        if self.padding_free is not True and (self.padding_free is False or not self.encoder.can_pack()):
            return False
        if self.padding_free is True:
            return True
        parameters, layers, hidden = self.dimensions()
        lengths = [group["attention_mask"].sum(dim=1).tolist() for group in groups]
        return packing_pays(lengths, self.length_buckets, parameters, layers, hidden, self.encoder.packs_varlen)

    def dimensions(self) -> tuple[int, int, int]:
        """(non-embedding parameters, layers, hidden width) of the backbone, for the cost rule."""
        if self._dimensions is None:
            model = self.encoder.model
            embedding = model.get_input_embeddings().weight.numel()
            total = sum(p.numel() for p in model.parameters())
            self._dimensions = (total - embedding, self.encoder.num_layers, self.encoder.embedding_dim)
        return self._dimensions
