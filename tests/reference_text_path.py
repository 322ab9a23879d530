"""The text path, kept only as the test oracle of the package's one training-data path (the token path).

Before the Arrow cache, training held every record as Python objects (`load_training_records`), and the collate
chose each query's passages as texts and tokenised every text group with the tokenizer's own padding
(`tokenize_with_prefixes`). The package now reads records from the Arrow records table, computes token ids once
and pads them with `collate.PaddingRule`; `tests/test_training_data_reference.py` and the cache tests check that
it gives this path's records and batches byte for byte. Written independently of the token path on purpose:
it draws passages as texts (not positions) and pads with `tokenizer(..., padding=True)`. Only the definitions
come from the package: the draw (`pick_fixed_count`, SPEC §3), the prefix rule (`prefix_pooling_mask`,
sentence-transformers' own), the text bound and the row validators.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch

from codiemb_pl.data.cache.records import text_id
from codiemb_pl.data.cache.token_ids import TokenLimits
from codiemb_pl.data.collate import pick_fixed_count
from codiemb_pl.data.records import IRRecord, STSRecord
from codiemb_pl.data.sources import SourceConfig, iter_ir_records, load_sts_pairs, subsample_positions
from codiemb_pl.model.pooling import leading_special_tokens, prefix_pooling_mask, prefix_token_count
from codiemb_pl.model.text_bound import bound_for_tokenizer


def load_training_records(cfg: SourceConfig) -> Union[list[IRRecord], list[STSRecord]]:
    """Every validated record of a training source as Python objects, after `max_samples` / `seed`."""
    if cfg.task == "sts":
        return load_sts_pairs(cfg)  # normalised scores, after max_samples / seed
    records = list(iter_ir_records(cfg))
    return [records[index] for index in subsample_positions(len(records), cfg)]


def tokenize_with_prefixes(tokenizer, texts: list[str], max_length: int,
                           prefixes: Optional[list[str]] = None) -> dict[str, torch.Tensor]:
    """Tokenise `prefix + text` with the tokenizer's own dynamic padding; add `pooling_mask` when any prefix is
    non-empty. Texts beyond `text_bound.char_bound(max_length)` characters are cut first (the ids stay the same)."""
    if prefixes is None or not any(prefixes):
        texts = bound_for_tokenizer(tokenizer, texts, max_length)
        return dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    joined = bound_for_tokenizer(tokenizer, [prefix + text for prefix, text in zip(prefixes, texts)], max_length)
    encoded = dict(tokenizer(joined, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    encoded["pooling_mask"] = prefix_pooling_mask(encoded["attention_mask"],
                                                  [prefix_token_count(tokenizer, prefix) for prefix in prefixes],
                                                  leading_special_tokens(tokenizer))
    return encoded


@dataclass(frozen=True)
class SampledItem:
    """A record as the text path's dataset handed it to the collate: where it came from, a per-(item, epoch) seed."""

    record: IRRecord | STSRecord
    dataset: str
    task: str
    instruction: str | None
    seed: int


class TextCollator:
    """Collate `SampledItem`s, tokenising each text group here with `tokenize(texts, max_length, prefixes)`."""

    def __init__(self, tokenize: Callable[..., dict[str, torch.Tensor]], *, limits: TokenLimits,
                 n_positives: int = 1, n_negatives: int = 0):
        self.tokenize, self.limits = tokenize, limits
        self.n_positives, self.n_negatives = n_positives, n_negatives

    def __call__(self, items: list[SampledItem]) -> dict[str, Any]:
        tasks, datasets = {item.task for item in items}, sorted({item.dataset for item in items})
        if len(tasks) == 1 and len(datasets) == 1:
            return self.collate_ir(items) if tasks.pop() == "ir" else self.collate_sts(items)
        ir_items = [item for item in items if item.task == "ir"]
        sts_items = [item for item in items if item.task == "sts"]
        return {"task": "mixed", "dataset": "+".join(datasets),
                "ir": self.collate_ir(ir_items) if ir_items else None,
                "sts": self.collate_sts(sts_items) if sts_items else None}

    def collate_ir(self, items: list[SampledItem]) -> dict[str, Any]:
        queries, positives, negatives, negative_mask, positive_ids, negative_ids = [], [], [], [], [], []
        any_negatives = self.n_negatives > 0 and any(item.record.negatives for item in items)
        for item in items:
            record, rng = item.record, random.Random(item.seed)
            queries.append(record.query)
            chosen_pos = pick_fixed_count(record.positives, self.n_positives, rng)
            positives.extend(chosen_pos)
            positive_ids.append([text_id(t) for t in chosen_pos])
            if any_negatives:
                chosen_neg = pick_fixed_count(record.negatives, self.n_negatives, rng)
                valid = [True] * len(chosen_neg) + [False] * (self.n_negatives - len(chosen_neg))
                chosen_neg = chosen_neg + [chosen_pos[0]] * (self.n_negatives - len(chosen_neg))  # masked slots
                negatives.extend(chosen_neg)
                negative_mask.append(valid)
                negative_ids.append([text_id(t) for t in chosen_neg])
        batch: dict[str, Any] = {
            "task": "ir", "dataset": items[0].dataset,
            "query": self.tokenize(queries, self.limits.query, [item.instruction or "" for item in items]),
            "positives": self.tokenize(positives, self.limits.passage),
            "positive_ids": torch.tensor(positive_ids, dtype=torch.long),
            "negatives": None, "negative_mask": None, "negative_ids": None,
        }
        if any_negatives:
            batch["negatives"] = self.tokenize(negatives, self.limits.passage)
            batch["negative_mask"] = torch.tensor(negative_mask, dtype=torch.bool)
            batch["negative_ids"] = torch.tensor(negative_ids, dtype=torch.long)
        return batch

    def collate_sts(self, items: list[SampledItem]) -> dict[str, Any]:
        prefixes = [item.instruction or "" for item in items]
        return {"task": "sts", "dataset": items[0].dataset,
                "text1": self.tokenize([item.record.text1 for item in items], self.limits.sts, prefixes),
                "text2": self.tokenize([item.record.text2 for item in items], self.limits.sts, prefixes),
                "scores": torch.tensor([float(item.record.score) for item in items], dtype=torch.float32)}


def text_collator(tokenizer, limits: TokenLimits, n_positives: int, n_negatives: int) -> TextCollator:
    """The text path's collate for `tokenizer`."""
    return TextCollator(lambda texts, n, prefixes=None: tokenize_with_prefixes(tokenizer, texts, n, prefixes),
                        limits=limits, n_positives=n_positives, n_negatives=n_negatives)
