"""Turn sampled records, as token ids, into micro-batches (see docs/ARCHITECTURE.md, "Batches").

Every consumer of training data (training, Self Positioning's probe) hands `TokenizedItem`s to
`TokenCollator`: it chooses each query's positives and hard negatives, then pads each text group
(queries, positives, negatives, STS sentences) on its own to its longest row, so a batch of short queries is
not padded to passage length. Instruction prefixes (SPEC §1) were prepended to queries (IR) or to both
sentences (STS) when the ids were computed; `PaddingRule` marks their tokens in a `pooling_mask` so mean
pooling leaves them out while attention still sees them.
"""

from __future__ import annotations

import math
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

    IR: `query`, `positives`, `negatives` (lists of token-id lists), the `text_id`s of the passages and the
    record's `teacher_scores` (positives, then negatives; None: none); STS: `text1`, `text2`, the normalised `score`
    (None: a pair with a teacher score only) and `teacher_score`. `prefix_tokens` counts the instruction prefix's
    tokens. `texts`: the record's texts (IR: query, positives, negatives; STS: text1, text2) when asked for.
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
    teacher_scores: list[float] | None = None
    teacher_score: float | None = None
    texts: tuple[str, ...] | None = None


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

    Items of one task and sub-dataset give that task's batch; anything else (the `mixed` and `joint` policies)
    gives `{"task": two_task, "ir": <IR batch>|None, "sts": <STS batch>|None}` (`two_task`: "mixed" or "joint"). The batches equal, byte for byte,
    those of tokenising the texts in the collate (the text path kept as the oracle of
    tests/test_training_data_reference.py).
    """

    def __init__(self, padding: PaddingRule, *, n_positives: int = 1, n_negatives: int = 0, two_task: str = "mixed"):
        self.padding = padding
        self.two_task = two_task
        self.n_positives = n_positives
        self.n_negatives = n_negatives

    def __call__(self, items: list[TokenizedItem]) -> dict[str, Any]:
        tasks = {item.task for item in items}
        datasets = sorted({item.dataset for item in items})
        if len(tasks) == 1 and len(datasets) == 1:
            return self.collate_ir(items) if tasks.pop() == "ir" else self.collate_sts(items)
        ir_items = [item for item in items if item.task == "ir"]
        sts_items = [item for item in items if item.task == "sts"]
        return {"task": self.two_task, "dataset": "+".join(datasets),
                "ir": self.collate_ir(ir_items) if ir_items else None,
                "sts": self.collate_sts(sts_items) if sts_items else None}

    def collate_ir(self, items: list[TokenizedItem]) -> dict[str, Any]:
        positives, negatives, negative_mask, positive_ids, negative_ids = [], [], [], [], []
        any_negatives = self.n_negatives > 0 and any(item.negatives for item in items)
        any_teacher = any(item.teacher_scores is not None for item in items)
        teacher_rows: list[list[float]] = []
        texts: dict[str, list[str]] = {"query": [], "positives": [], "negatives": []}
        for item in items:
            pos_at, neg_at = choose_passages(len(item.positives), len(item.negatives), self.n_positives,
                                             self.n_negatives, item.seed, any_negatives)
            positives += [item.positives[i] for i in pos_at]
            positive_ids.append([item.positive_text_ids[i] for i in pos_at])
            padding = self.n_negatives - len(neg_at) if any_negatives else 0
            if any_negatives:
                # padding slots repeat the first positive so every row has text; they are masked out.
                negatives += [item.negatives[i] for i in neg_at] + [item.positives[pos_at[0]]] * padding
                negative_mask.append([True] * len(neg_at) + [False] * padding)
                negative_ids.append([item.negative_text_ids[i] for i in neg_at] + [positive_ids[-1][0]] * padding)
            if any_teacher:  # the chosen candidates' scores travel with them (padding slots: 0, masked out)
                teacher_rows.append(chosen_teacher_scores(item, pos_at, neg_at, padding, any_negatives))
            if item.texts is not None:
                passages = item.texts[1:]
                texts["query"].append(item.texts[0])
                texts["positives"] += [passages[i] for i in pos_at]
                if any_negatives:
                    texts["negatives"] += [passages[len(item.positives) + i] for i in neg_at] + \
                        [passages[pos_at[0]]] * padding
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
        if any_teacher:
            batch["teacher_scores"] = torch.tensor(teacher_rows, dtype=torch.float32)
        if all(item.texts is not None for item in items):
            batch["texts"] = {name: group for name, group in texts.items() if group}
        return batch

    def collate_sts(self, items: list[TokenizedItem]) -> dict[str, Any]:
        """Pairs with gold `scores`; a pair without one takes its teacher score there (SPEC §10: y = y_T), and
        `gold_mask` marks which pairs have gold; `teacher_scores` (NaN: none) when any pair has one."""
        prefixes = [item.prefix_tokens for item in items]
        batch: dict[str, Any] = {
            "task": "sts", "dataset": items[0].dataset,
            "text1": self.padding.pad([item.text1 for item in items], prefixes),
            "text2": self.padding.pad([item.text2 for item in items], prefixes),
            "scores": torch.tensor([item.teacher_score if item.score is None else item.score for item in items],
                                   dtype=torch.float32)}
        if any(item.teacher_score is not None for item in items):
            batch["teacher_scores"] = torch.tensor([math.nan if item.teacher_score is None else item.teacher_score
                                                    for item in items], dtype=torch.float32)
        if any(item.score is None for item in items):
            batch["gold_mask"] = torch.tensor([item.score is not None for item in items], dtype=torch.bool)
        if all(item.texts is not None for item in items):
            batch["texts"] = {"text1": [item.texts[0] for item in items], "text2": [item.texts[1] for item in items]}
        return batch


def chosen_teacher_scores(item: TokenizedItem, positions: list[int], negative_positions: list[int], padding: int,
                          with_negatives: bool) -> list[float]:
    """The record's teacher scores of the chosen positives, then of the chosen negatives and `padding` zeros (when the
    batch has negative slots); NaN for every slot when the record has none."""
    width = len(positions) + (len(negative_positions) + padding if with_negatives else 0)
    if item.teacher_scores is None:
        return [math.nan] * width
    scores = [item.teacher_scores[i] for i in positions]
    if with_negatives:
        scores += [item.teacher_scores[len(item.positives) + i] for i in negative_positions] + [0.0] * padding
    return scores
