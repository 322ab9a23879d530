"""The records every data source is turned into: IR queries with passages, scored STS pairs, and
BEIR-style retrieval sets for evaluation. Plain frozen dataclasses, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IRRecord:
    """One query with its positive passages (at least one) and optional hard negatives; `teacher_scores`: a
    teacher's score of each positive, then each negative (SPEC §10), or None."""

    query: str
    positives: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    teacher_scores: tuple[float, ...] | None = None


@dataclass(frozen=True)
class STSRecord:
    """One scored text pair; `score` is already normalised to [0, 1] (None: a training pair with a teacher score
    only); `teacher_score`: a teacher's similarity in [0, 1], or None."""

    text1: str
    text2: str
    score: float | None
    teacher_score: float | None = None


@dataclass(frozen=True)
class IRCorpus:
    """An evaluation retrieval set in MTEB's conventions.

    `queries`: query id -> text (only queries with at least one judgement);
    `corpus`: doc id -> `title + " " + text` (the text alone when there is no title);
    `qrels`: query id -> {doc id: graded relevance}; a relevance of 0 is a judgement, not a hit.
    """

    queries: dict[str, str]
    corpus: dict[str, str]
    qrels: dict[str, dict[str, int]]
