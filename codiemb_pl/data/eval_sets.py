"""Evaluation sets (`EvalSet`: what validation, test, predict, `codiemb evaluate`, fusion and BOOM scoring
encode) as flat lists of texts, sharded across ranks and re-assembled for scoring.

An evaluation set is either STS pairs (two text fields) or a BEIR-style retrieval set (queries and the
full corpus). Every text is encoded once; batches hold texts of one field, sorted by length so that
dynamic padding wastes little. Rank `r` takes batches `r, r+W, r+2W, ...` (the last rank's list is
padded by repeating its final batch so every rank runs the same number of steps); the module scatters
embeddings into per-field buffers and sums them across ranks together with a count buffer, so repeated
rows average to themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from codiemb_pl.data.records import IRCorpus, STSRecord


@dataclass
class EvalSet:
    """One named evaluation set and the texts of each of its fields, in a fixed order."""

    name: str
    task: str  # "ir" or "sts"
    texts: dict[str, list[str]]  # field -> texts ("text1", "text2") or ("query", "corpus")
    prefixes: dict[str, str] = field(default_factory=dict)  # field -> instruction prefix (left out of pooling)
    gold: list[float] = field(default_factory=list)  # STS: normalised gold scores
    query_ids: list[str] = field(default_factory=list)
    doc_ids: list[str] = field(default_factory=list)
    qrels: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def from_sts(cls, name: str, pairs: list[STSRecord], prefix: str = "") -> "EvalSet":
        return cls(name=name, task="sts",
                   texts={"text1": [p.text1 for p in pairs], "text2": [p.text2 for p in pairs]},
                   prefixes={"text1": prefix, "text2": prefix},
                   gold=[p.score for p in pairs])

    @classmethod
    def from_ir(cls, name: str, corpus: IRCorpus, query_prefix: str = "", passage_prefix: str = "") -> "EvalSet":
        query_ids = sorted(corpus.queries)
        doc_ids = sorted(corpus.corpus)
        return cls(name=name, task="ir",
                   texts={"query": [corpus.queries[q] for q in query_ids],
                          "corpus": [corpus.corpus[d] for d in doc_ids]},
                   prefixes={"query": query_prefix, "corpus": passage_prefix},
                   query_ids=query_ids, doc_ids=doc_ids, qrels=corpus.qrels)


@dataclass(frozen=True)
class TextChunk:
    """Indices of texts of one field of one set that are encoded together."""

    set_index: int
    field: str
    rows: tuple[int, ...]


def plan_eval_chunks(sets: list[EvalSet], batch_size: int, world_size: int = 1,
                           rank: int = 0) -> list[TextChunk]:
    """Cut every field into length-sorted chunks and return this rank's share (equal count on every rank)."""
    chunks: list[TextChunk] = []
    for set_index, vset in enumerate(sets):
        for field_name, texts in vset.texts.items():
            order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
            for start in range(0, len(order), batch_size):
                chunks.append(TextChunk(set_index, field_name, tuple(order[start:start + batch_size])))
    per_rank = -(-len(chunks) // world_size) if chunks else 0
    mine = chunks[rank::world_size]
    while mine and len(mine) < per_rank:
        mine.append(mine[-1])
    return mine


class EmbeddingBuffers:
    """Per-(set, field) accumulation of embeddings that can be summed across ranks."""

    def __init__(self, sets: list[EvalSet], dim: int, device: torch.device | str = "cpu"):
        self.sets = sets
        # float32 whatever the default dtype (`trainer.precision: 64-true` makes it float64 for the run)
        self.sums = {(i, f): torch.zeros(len(t), dim, device=device, dtype=torch.float32)
                     for i, s in enumerate(sets) for f, t in s.texts.items()}
        self.counts = {key: torch.zeros(len(value), device=device, dtype=torch.float32) for key, value in self.sums.items()}

    def add(self, set_index: int, field_name: str, rows: torch.Tensor, embeddings: torch.Tensor) -> None:
        key = (set_index, field_name)
        self.sums[key].index_add_(0, rows.to(self.sums[key].device), embeddings.detach().float())
        self.counts[key].index_add_(0, rows.to(self.counts[key].device),
                                    torch.ones(len(rows), device=self.counts[key].device, dtype=torch.float32))

    def all_reduce(self, reduce_sum) -> None:
        """Sum buffers across ranks with `reduce_sum(tensor) -> tensor` (identity in one process)."""
        for key in self.sums:
            self.sums[key] = reduce_sum(self.sums[key])
            self.counts[key] = reduce_sum(self.counts[key])

    def complete(self) -> bool:
        """True when every text of every set has been encoded at least once (on some rank)."""
        return all(bool((counts > 0).all()) for counts in self.counts.values())

    def embeddings(self, set_index: int, field_name: str) -> torch.Tensor:
        key = (set_index, field_name)
        counts = self.counts[key]
        if bool((counts == 0).any()):
            missing = int((counts == 0).sum())
            raise RuntimeError(f"evaluation set {self.sets[set_index].name!r} field {field_name!r}: "
                               f"{missing} texts were never encoded")
        return self.sums[key] / counts.unsqueeze(1)
