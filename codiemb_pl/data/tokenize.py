"""Instruction prefixes: the one rule that leaves the prefix's tokens out of pooling (the template that makes
an instruction a prefix is `data.instructions`; `prefix + text` is tokenised by `collate.tokenize_texts` and the
token cache).

SPEC §1: "with mean pooling the prefix tokens are excluded from the mean but still attended to". For a
text `prefix + text`, the tokens of `prefix` (counted by tokenising the prefix alone) and the tokenizer's
leading special tokens before them (`[CLS]`) get `pooling_mask = 0`; `attention_mask` keeps them. This
is sentence-transformers' `Pooling(include_prompt=False)` rule for a prompt, so a training instruction
exported as a prompt (`callbacks.export.training_prompts`) gives `SentenceTransformer(folder).encode(q,
prompt_name=...)` exactly the training embedding. Training, validation and every evaluation path
(`codiemb evaluate`, fusion scoring, `TextEncoder.encode(prefix=...)` and `encode(prompt=...)`) use
`prefix_pooling_mask`. Texts without a prefix pool every token.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `codiemb evaluate --help` needs only the template
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
def prefix_token_count(tokenizer, prefix: str) -> int:
    """Tokens `prefix` occupies on its own (no special tokens)."""
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else 0


def prefix_pooling_mask(attention_mask: torch.Tensor, prefix_tokens: Sequence[int], leading: int,
                        pool_leading: bool = False) -> torch.Tensor:
    """Copy of `attention_mask` `[b, t]` with each row's prefix tokens (and the leading special tokens before
    them) set to 0, i.e. left out of pooling.

    Row i's real tokens start at `s_i` (its first `M[i,t] = 1`, so left padding works) and number `r_i`;
    its prefix covers positions `[s_i + leading, s_i + leading + prefix_tokens[i])`. Zeroed:
    `[s_i, min(s_i + leading + prefix_tokens[i], s_i + r_i - 1))` (sentence-transformers' rule), so a text
    truncated inside its prefix keeps its last real token. Rows with `prefix_tokens[i] = 0` are unchanged.
    `pool_leading=True` keeps the leading special tokens pooled (zeroes from `s_i + leading`), the rule
    before the exported prompts had to reproduce training; nothing in the package uses it.
    """
    import torch

    mask = attention_mask.clone()
    counts = torch.as_tensor(list(prefix_tokens), dtype=torch.long, device=mask.device).unsqueeze(1)
    first = mask.to(torch.int32).argmax(dim=1, keepdim=True).long()
    real = mask.sum(dim=1, keepdim=True).long()
    start = first + (leading if pool_leading else 0)
    stop = torch.minimum(first + leading + counts, first + real - 1)
    stop = torch.where(counts > 0, stop, start)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask.masked_fill((positions >= start) & (positions < stop), 0)
