"""Turn sampled records into tokenised micro-batches (see docs/ARCHITECTURE.md, "Batches").

Each text group (queries, positives, negatives, STS sentences) is tokenised on its own with dynamic
padding and its own maximum length, so a batch of short queries is not padded to passage length.
Instruction prefixes (SPEC §1) are prepended to queries (IR) or to both sentences (STS); the
tokeniser marks their tokens in a `pooling_mask` so mean pooling leaves them out while attention
still sees them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .records import IRRecord, STSRecord


def text_id(text: str) -> int:
    """A stable 63-bit hash of a text (identical in every process), for cross-device duplicate checks."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


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


@dataclass(frozen=True)
class SampledItem:
    """A record as the dataset hands it to the collate: where it came from and a per-(item, epoch) seed."""

    record: IRRecord | STSRecord
    dataset: str
    task: str
    instruction: str | None
    seed: int


@dataclass
class LengthLimits:
    """Maximum token counts per text group."""

    query: int = 64
    passage: int = 256
    sts: int = 128


class CoDiEmbCollator:
    """Collate `SampledItem`s of one task (or of both, for the `mixed` baseline) into tensors."""

    def __init__(self, tokenize: Callable[..., dict[str, torch.Tensor]], *, limits: LengthLimits,
                 n_positives: int = 1, n_negatives: int = 0):
        self.tokenize = tokenize
        self.limits = limits
        self.n_positives = n_positives
        self.n_negatives = n_negatives

    def __call__(self, items: list[SampledItem]) -> dict[str, Any]:
        tasks = {item.task for item in items}
        datasets = sorted({item.dataset for item in items})
        if len(tasks) == 1 and len(datasets) == 1:
            task = tasks.pop()
            return self.collate_ir(items) if task == "ir" else self.collate_sts(items)
        ir_items = [item for item in items if item.task == "ir"]
        sts_items = [item for item in items if item.task == "sts"]
        return {"task": "mixed", "dataset": "+".join(datasets),
                "ir": self.collate_ir(ir_items) if ir_items else None,
                "sts": self.collate_sts(sts_items) if sts_items else None}

    def collate_ir(self, items: list[SampledItem]) -> dict[str, Any]:
        queries, positives, negatives, negative_mask, positive_ids, negative_ids = [], [], [], [], [], []
        any_negatives = self.n_negatives > 0 and any(item.record.negatives for item in items)
        for item in items:
            record: IRRecord = item.record  # type: ignore[assignment]
            rng = random.Random(item.seed)
            queries.append(record.query)
            chosen_pos = pick_fixed_count(record.positives, self.n_positives, rng)
            positives.extend(chosen_pos)
            positive_ids.append([text_id(t) for t in chosen_pos])
            if any_negatives:
                chosen_neg = pick_fixed_count(record.negatives, self.n_negatives, rng)
                valid = [True] * len(chosen_neg) + [False] * (self.n_negatives - len(chosen_neg))
                # padding slots repeat the first positive so every row has text; they are masked out.
                chosen_neg = chosen_neg + [chosen_pos[0]] * (self.n_negatives - len(chosen_neg))
                negatives.extend(chosen_neg)
                negative_mask.append(valid)
                negative_ids.append([text_id(t) for t in chosen_neg])
        batch: dict[str, Any] = {
            "task": "ir",
            "dataset": items[0].dataset,
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
        text1 = [item.record.text1 for item in items]  # type: ignore[union-attr]
        text2 = [item.record.text2 for item in items]  # type: ignore[union-attr]
        scores = [float(item.record.score) for item in items]  # type: ignore[union-attr]
        return {"task": "sts", "dataset": items[0].dataset,
                "text1": self.tokenize(text1, self.limits.sts, prefixes),
                "text2": self.tokenize(text2, self.limits.sts, prefixes),
                "scores": torch.tensor(scores, dtype=torch.float32)}
