"""Turn sampled records, as token ids, into micro-batches (see docs/ARCHITECTURE.md, "Batches").

Every consumer of training data (training, Self Positioning's probe) hands `TokenizedItem`s to
`TokenCollator`: it chooses each query's positives and hard negatives, then pads each text group
(queries, positives, negatives, STS sentences) on its own to its longest row, so a batch of short queries is
not padded to passage length. Instruction prefixes (SPEC §1) were prepended to queries (IR) or to both
sentences (STS) when the ids were computed; `PaddingRule` marks their tokens in a `pooling_mask` so mean
pooling leaves them out while attention still sees them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from codiemb_pl.data.cache.token_ids import text_token_ids
from codiemb_pl.model.pooling import leading_special_tokens, prefix_pooling_mask, prefix_token_count


def pick_fixed_count(items: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """Choose exactly `count` items: a random subset when there are more, re-sampled fill when fewer (SPEC §3)."""
    if count <= 0 or not items:
        return []
    if len(items) >= count:
        return rng.sample(list(items), count)
    chosen = list(items)
    rng.shuffle(chosen)
    while len(chosen) < count:
        chosen.append(items[rng.randrange(len(items))])
    return chosen


def choose_passages(positive_count: int, negative_count: int, n_positives: int, n_negatives: int, seed: int,
                    with_negatives: bool) -> tuple[list[int], list[int]]:
    """Positions of the positives and hard negatives one query trains with (SPEC §3), drawn from
    `random.Random(seed)`: `pick_fixed_count` of the positives, then (when the batch has negatives) of the
    negatives. The draws depend only on the counts, so positions select the same texts as the texts would."""
    rng = random.Random(seed)
    positives = pick_fixed_count(range(positive_count), n_positives, rng)
    negatives = pick_fixed_count(range(negative_count), n_negatives, rng) if with_negatives else []
    return positives, negatives


@dataclass(frozen=True)
class TokenizedItem:
    """A record as token ids (read from the token cache), handed to `TokenCollator`.

    IR: `query`, `positives`, `negatives` (lists of token-id lists) and the `text_id`s of the passages;
    STS: `text1`, `text2` and the normalised `score`. `prefix_tokens` counts the instruction prefix's tokens.
    """

    dataset: str
    task: str
    seed: int
    prefix_tokens: int
    query: list[int] | None = None
    positives: list[list[int]] | None = None
    negatives: list[list[int]] | None = None
    positive_text_ids: list[int] | None = None
    negative_text_ids: list[int] | None = None
    text1: list[int] | None = None
    text2: list[int] | None = None
    score: float | None = None


@dataclass(frozen=True)
class PaddingRule:
    """The one padding rule of every batch the data layer builds (training, the probe, validation / test /
    predict encoding): how the tokenizer pads, read from it. Pad id, side (left for decoder backbones, which
    `model.decoder.prepare_tokenizer` sets; right otherwise), whether it returns `token_type_ids` (0 for one
    text), and how many special tokens precede the text (`model.pooling.leading_special_tokens`)."""

    pad_token_id: int
    left: bool
    token_type_ids: bool
    leading: int

    @classmethod
    def of(cls, tokenizer) -> "PaddingRule":
        return cls(tokenizer.pad_token_id, tokenizer.padding_side == "left",
                   "token_type_ids" in tokenizer.model_input_names, leading_special_tokens(tokenizer))

    def pad(self, sequences: list[list[int]], prefix_tokens: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """`sequences` padded to the longest, as `tokenizer(..., padding=True, return_tensors="pt")` would;
        with `pooling_mask` (prefix tokens left out) when any `prefix_tokens` is non-zero."""
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, ids in enumerate(sequences):
            span = slice(width - len(ids), width) if self.left else slice(0, len(ids))
            input_ids[row, span] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, span] = 1
        encoded = {"input_ids": input_ids}
        if self.token_type_ids:
            encoded["token_type_ids"] = torch.zeros_like(input_ids)
        encoded["attention_mask"] = attention_mask
        if prefix_tokens is not None and any(prefix_tokens):
            encoded["pooling_mask"] = prefix_pooling_mask(attention_mask, prefix_tokens, self.leading)
        return encoded


def tokenize_texts(tokenizer, texts: list[str], max_length: int, prefixes: Sequence[str] | None = None,
                   padding: PaddingRule | None = None) -> dict[str, torch.Tensor]:
    """`prefixes[i] + texts[i]` as the token cache holds it (`token_ids.text_token_ids`: truncated to `max_length`,
    over-long texts cut first to the same ids), padded by `padding` (default: `PaddingRule.of(tokenizer)`), with
    `pooling_mask` leaving each prefix's tokens out when any prefix has tokens. What validation, test and
    predict encode (`CoDiEmbDataModule.tokenize`)."""
    joined = list(texts) if prefixes is None else [prefix + text for prefix, text in zip(prefixes, texts)]
    counts = None if prefixes is None else [prefix_token_count(tokenizer, prefix) for prefix in prefixes]
    return (padding or PaddingRule.of(tokenizer)).pad(text_token_ids(tokenizer, joined, max_length), counts)


class TokenCollator:
    """Collate `TokenizedItem`s: select positives/negatives (`choose_passages`), pad, mask prefixes.

    Items of one task and sub-dataset give that task's batch; anything else (the `mixed` policy) gives
    `{"task": "mixed", "ir": <IR batch>|None, "sts": <STS batch>|None}`. The batches equal, byte for byte,
    those of tokenising the texts in the collate (the text path kept as the oracle of
    tests/test_training_data_reference.py).
    """

    def __init__(self, padding: PaddingRule, *, n_positives: int = 1, n_negatives: int = 0):
        self.padding = padding
        self.n_positives = n_positives
        self.n_negatives = n_negatives

    def __call__(self, items: list[TokenizedItem]) -> dict[str, Any]:
        tasks = {item.task for item in items}
        datasets = sorted({item.dataset for item in items})
        if len(tasks) == 1 and len(datasets) == 1:
            return self.collate_ir(items) if tasks.pop() == "ir" else self.collate_sts(items)
        ir_items = [item for item in items if item.task == "ir"]
        sts_items = [item for item in items if item.task == "sts"]
        return {"task": "mixed", "dataset": "+".join(datasets),
                "ir": self.collate_ir(ir_items) if ir_items else None,
                "sts": self.collate_sts(sts_items) if sts_items else None}

    def collate_ir(self, items: list[TokenizedItem]) -> dict[str, Any]:
        positives, negatives, negative_mask, positive_ids, negative_ids = [], [], [], [], []
        any_negatives = self.n_negatives > 0 and any(item.negatives for item in items)
        for item in items:
            pos_at, neg_at = choose_passages(len(item.positives), len(item.negatives), self.n_positives,
                                             self.n_negatives, item.seed, any_negatives)
            positives += [item.positives[i] for i in pos_at]
            positive_ids.append([item.positive_text_ids[i] for i in pos_at])
            if any_negatives:
                padding = self.n_negatives - len(neg_at)
                # padding slots repeat the first positive so every row has text; they are masked out.
                negatives += [item.negatives[i] for i in neg_at] + [item.positives[pos_at[0]]] * padding
                negative_mask.append([True] * len(neg_at) + [False] * padding)
                negative_ids.append([item.negative_text_ids[i] for i in neg_at] + [positive_ids[-1][0]] * padding)
        batch: dict[str, Any] = {
            "task": "ir", "dataset": items[0].dataset,
            "query": self.padding.pad([item.query for item in items], [item.prefix_tokens for item in items]),
            "positives": self.padding.pad(positives),
            "positive_ids": torch.tensor(positive_ids, dtype=torch.long),
            "negatives": None, "negative_mask": None, "negative_ids": None,
        }
        if any_negatives:
            batch["negatives"] = self.padding.pad(negatives)
            batch["negative_mask"] = torch.tensor(negative_mask, dtype=torch.bool)
            batch["negative_ids"] = torch.tensor(negative_ids, dtype=torch.long)
        return batch

    def collate_sts(self, items: list[TokenizedItem]) -> dict[str, Any]:
        prefixes = [item.prefix_tokens for item in items]
        return {"task": "sts", "dataset": items[0].dataset,
                "text1": self.padding.pad([item.text1 for item in items], prefixes),
                "text2": self.padding.pad([item.text2 for item in items], prefixes),
                "scores": torch.tensor([item.score for item in items], dtype=torch.float32)}
