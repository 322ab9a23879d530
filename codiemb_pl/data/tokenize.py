"""Tokenise texts with optional instruction prefixes, marking prefix tokens out of the pooling mask.

SPEC §1: "with mean pooling the prefix tokens are excluded from the mean but still attended to". For a
text `prefix + text`, the tokens of `prefix` (counted by tokenising the prefix alone, after the
tokenizer's leading special tokens) get `pooling_mask = 0`; `attention_mask` keeps them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch


def leading_special_tokens(tokenizer) -> int:
    """How many special tokens the tokenizer puts before the text (1 for BERT's [CLS], 0 for most decoders)."""
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start:start + len(without)] == without:
            return start
    return 0


@lru_cache(maxsize=4096)
def _prefix_length(tokenizer, prefix: str) -> int:
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])


def tokenize_with_prefixes(tokenizer, texts: list[str], max_length: int,
                           prefixes: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Tokenise `prefix + text` with dynamic padding; add `pooling_mask` when any prefix is non-empty."""
    if prefixes is None or not any(prefixes):
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    joined = [prefix + text for prefix, text in zip(prefixes, texts)]
    encoded = dict(tokenizer(joined, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    pooling_mask = encoded["attention_mask"].clone()
    lead = leading_special_tokens(tokenizer)
    width = pooling_mask.shape[1]
    for row, prefix in enumerate(prefixes):
        if prefix:
            real = int(encoded["attention_mask"][row].sum())
            start = lead + (width - real if tokenizer.padding_side == "left" else 0)
            # never mask the whole text away: keep at least one non-prefix token when truncated
            stop = min(start + _prefix_length(tokenizer, prefix), start - lead + real - 1)
            pooling_mask[row, start:max(start, stop)] = 0
    encoded["pooling_mask"] = pooling_mask
    return encoded
