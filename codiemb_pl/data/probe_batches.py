"""Fixed training-shaped batches cut from evaluation sets: the probe batches of the gradient-conflict diagnostics.

A probe batch of a task is the first `n` items of that task's first validation set, shaped like a training batch of
the task (`data/collate.py`), never drawn from the training stream:

    IR   the first n queries (in query-id order) with a relevant document; each query's positive is its first relevant
         document (doc-id order); no hard negatives (in-batch negatives only); `positive_ids` = corpus rows
    STS  the first n pairs with their normalised gold scores

`n` is a multiple of the world size W; rank r takes rows [r·n/W, (r+1)·n/W), so the ranks together score the same n
items as one process does (cross-device gathers as in training).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from codiemb_pl.data.eval_sets import EvalSet
from codiemb_pl.errors import InputError

Tokenize = Callable[..., dict[str, torch.Tensor]]   # (texts, max_length, prefixes) -> features


def no_probe_set(task: str) -> InputError:
    """The error of a run whose validation sets have no set of `task` to cut a probe batch from."""
    return InputError("model.conflict_every", f"the gradient-conflict probe needs an {task.upper()} validation set "
                      "(its probe batch), data.val has none", f"add an {task.upper()} set under data.val, or set "
                      "model.conflict_every: 0")


def ir_probe_pairs(vset: EvalSet) -> list[tuple[int, int]]:
    """(query row, corpus row of its first relevant document) of every query of `vset` that has one."""
    doc_rows = {doc_id: row for row, doc_id in enumerate(vset.doc_ids)}
    pairs = []
    for row, query_id in enumerate(vset.query_ids):
        relevant = sorted(doc for doc, grade in vset.qrels.get(query_id, {}).items() if grade > 0 and doc in doc_rows)
        if relevant:
            pairs.append((row, doc_rows[relevant[0]]))
    return pairs


def probe_item_count(vset: EvalSet) -> int:
    """Items of `vset` a probe batch can use: IR queries with a relevant document, or STS pairs."""
    return len(ir_probe_pairs(vset)) if vset.task == "ir" else len(vset.gold)


def probe_rows(available: int, wanted: int, world_size: int, rank: int, where: str) -> range:
    """This rank's rows of a probe batch of min(wanted, available) items rounded down to a multiple of W."""
    size = min(wanted, available) // world_size * world_size
    if size < world_size:
        raise InputError(where, f"has {available} usable items, fewer than the {world_size} devices (one each at least)",
                         "add items to that validation set, or set model.conflict_every: 0")
    per_rank = size // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def ir_probe_batch(vset: EvalSet, rows: range, tokenize: Tokenize, limits: dict[str, int]) -> dict[str, Any]:
    """The IR probe batch of `rows` (of `ir_probe_pairs`): queries and one positive each, in-batch negatives only."""
    usable = ir_probe_pairs(vset)
    pairs = [usable[row] for row in rows]
    queries = [vset.texts["query"][query] for query, _ in pairs]
    passages = [vset.texts["corpus"][doc] for _, doc in pairs]
    query_prefix, passage_prefix = vset.prefixes.get("query", ""), vset.prefixes.get("corpus", "")
    return {"task": "ir", "dataset": f"probe:{vset.name}",
            "query": tokenize(queries, limits["query"], [query_prefix] * len(queries) if query_prefix else None),
            "positives": tokenize(passages, limits["corpus"],
                                  [passage_prefix] * len(passages) if passage_prefix else None),
            "positive_ids": torch.tensor([[doc] for _, doc in pairs], dtype=torch.long),
            "negatives": None, "negative_mask": None, "negative_ids": None}


def sts_probe_batch(vset: EvalSet, rows: range, tokenize: Tokenize, limits: dict[str, int]) -> dict[str, Any]:
    """The STS probe batch of `rows`: the pairs and their normalised gold scores."""
    texts = {field: [vset.texts[field][row] for row in rows] for field in ("text1", "text2")}
    features = {}
    for field, group in texts.items():
        prefix = vset.prefixes.get(field, "")
        features[field] = tokenize(group, limits[field], [prefix] * len(group) if prefix else None)
    return {"task": "sts", "dataset": f"probe:{vset.name}", **features,
            "scores": torch.tensor([vset.gold[row] for row in rows], dtype=torch.float32)}


def probe_batches(sets: list[EvalSet], sizes: dict[str, int], tokenize: Tokenize, limits: dict[str, int],
                  world_size: int = 1, rank: int = 0) -> dict[str, dict[str, Any]]:
    """{task: this rank's probe batch} from the first set of each task in `sets`; `sizes[task]` items wanted (the
    task's global training batch); one `InputError` when a task has no set."""
    batches = {}
    for task, build in (("ir", ir_probe_batch), ("sts", sts_probe_batch)):
        vset = next((candidate for candidate in sets if candidate.task == task), None)
        if vset is None:
            raise no_probe_set(task)
        rows = probe_rows(probe_item_count(vset), sizes[task], world_size, rank, f"data.val {vset.name}")
        batches[task] = build(vset, rows, tokenize, limits)
    return batches
