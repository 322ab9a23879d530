"""The online teacher's signal for one training micro-batch (SPEC §10), recomputed at every step, never cached.

`teacher_signal(teacher, batch, scores=..., embeddings=...)` reads the batch's texts (`batch["texts"]`, which the
data module adds when asked: `CoDiEmbDataModule.carry_texts`) and returns the entries `DistilledObjective` reads:

- IR `teacher_scores` [b, P + N]: the teacher's score of each query with its own chosen positives, then negatives
  (bi-encoder cosines or cross-encoder logits, raw);
- STS `teacher_scores` [b]: the teacher's similarity of each pair mapped to [0, 1] (`unit_scores`);
- `teacher_embeddings` {group: [n, d_T]} (bi-encoder only): every text group's embeddings, queries and STS
  sentences with the teacher's query prompt, passages with its document prompt.

Everything runs without gradients on this rank's own texts: a query's candidates live on its rank, so nothing
is gathered. Plain torch; the module puts the result into the batch before embedding it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from codiemb_pl.errors import InputError

ROLE_OF_GROUP = {"query": "query", "positives": "document", "negatives": "document", "text1": "query",
                 "text2": "query"}


def batch_texts(batch: Mapping[str, Any]) -> dict[str, list[str]]:
    texts = batch.get("texts")
    if texts is None:
        raise InputError("model.distillation.teacher", "the training batches carry no texts for the online teacher",
                         "train with CoDiEmbDataModule (it adds them when the module asks: carry_texts), or put a "
                         "`texts` entry in each batch")
    return texts


@torch.no_grad()
def teacher_signal(teacher: Any, batch: Mapping[str, Any], *, scores: bool, embeddings: bool,
                   device: torch.device | str = "cpu") -> dict[str, Any]:
    """`teacher_scores` (when `scores`) and `teacher_embeddings` (when `embeddings`) of `batch` (module docstring),
    float32 on `device`."""
    texts = batch_texts(batch)
    signal: dict[str, Any] = {}
    groups: dict[str, Tensor] = {}
    if embeddings or (scores and teacher.kind == "bi_encoder"):
        groups = {name: teacher.embed(group, ROLE_OF_GROUP[name]) for name, group in texts.items()}
        if embeddings:
            signal["teacher_embeddings"] = {name: value.to(device) for name, value in groups.items()}
    if scores:
        task = batch["task"]
        signal["teacher_scores"] = (ir_teacher_scores(teacher, texts, groups) if task == "ir"
                                    else sts_teacher_scores(teacher, texts, groups)).to(device)
    return signal


def ir_teacher_scores(teacher: Any, texts: Mapping[str, list[str]], groups: Mapping[str, Tensor]) -> Tensor:
    """[b, P + N]: query i with its own positives (rows i·P ...), then its own negatives (rows i·N ...)."""
    size = len(texts["query"])
    if teacher.kind != "bi_encoder":
        candidates = [per_query(texts["positives"], size, i) + per_query(texts.get("negatives", []), size, i)
                      for i in range(size)]
        return torch.stack(teacher.score_candidates(texts["query"], candidates))
    queries = torch.nn.functional.normalize(groups["query"], dim=-1)
    candidates = [torch.nn.functional.normalize(groups[name], dim=-1).view(size, -1, queries.shape[-1])
                  for name in ("positives", "negatives") if name in groups]
    return torch.einsum("bd,bcd->bc", queries, torch.cat(candidates, dim=1))


def sts_teacher_scores(teacher: Any, texts: Mapping[str, list[str]], groups: Mapping[str, Tensor]) -> Tensor:
    """[b]: each pair's teacher similarity in [0, 1]."""
    if teacher.kind != "bi_encoder":
        return teacher.unit_scores(teacher.pair_scores(texts["text1"], texts["text2"]))
    first, second = (torch.nn.functional.normalize(groups[name], dim=-1) for name in ("text1", "text2"))
    return teacher.unit_scores((first * second).sum(dim=-1))


def per_query(group: list[str], size: int, row: int) -> list[str]:
    """Query `row`'s slice of a query-major group of `size` queries."""
    width = len(group) // size
    return group[row * width:(row + 1) * width]
