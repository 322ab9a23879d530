"""Teacher-aware mining: a second scorer (a bi- or cross-encoder teacher, `model/teacher.py`) rescores each query's
mined candidates, drops likely false negatives and inconsistent queries, and records its scores for distillation.

For one query with positives P and mined candidates C (in the miner's rank order), the teacher gives raw scores
t(q, d) (cosines or logits) and their [0, 1] mapping u(q, d) (`unit_scores`: clip or sigmoid):

- consistency (`top_k`): the query is dropped when its best positive is not in the teacher's top k of
  {best positive} ∪ C, i.e. when 1 + #{c ∈ C : t(q, c) > max_p t(q, p)} > k;
- margin (`margin`): a candidate is dropped when u(q, c) >= margin × min_p u(q, p) (as the miner's own margin);
- the first `num_negatives` kept candidates become the negatives, and `teacher_scores` = the raw scores of the
  positives, then of those negatives (the record layout training reads, `data/records.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor

from codiemb_pl.errors import InputError


@dataclass(frozen=True)
class TeacherFilterSettings:
    """The teacher's filters (see the module docstring); None switches one off."""

    margin: Optional[float] = 0.95
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if self.margin is not None and not self.margin > 0:
            raise InputError("--teacher-margin", f"must be > 0, got {self.margin}", "e.g. 0.95, or --no-margin")
        if self.top_k is not None and self.top_k < 1:
            raise InputError("--teacher-top-k", f"must be at least 1, got {self.top_k}", "e.g. 10")


@dataclass
class TeacherFilterReport:
    """What the teacher rescored and what each filter removed."""

    queries_rescored: int = 0
    candidates_rescored: int = 0
    queries_removed_by_top_k: int = 0
    candidates_removed_by_margin: int = 0

    def summary(self, teacher_name: str, settings: TeacherFilterSettings) -> str:
        margin = ("no margin" if settings.margin is None else
                  f"margin {settings.margin:g} removed {self.candidates_removed_by_margin} candidates")
        top_k = ("no consistency filter" if settings.top_k is None else
                 f"top-{settings.top_k} consistency removed {self.queries_removed_by_top_k} queries")
        return (f"teacher {teacher_name} rescored {self.candidates_rescored} candidates of {self.queries_rescored} "
                f"queries: {top_k}; {margin}")


def is_consistent(positive_raw: Tensor, candidate_raw: Tensor, top_k: Optional[int]) -> bool:
    """Whether the best positive ranks within the top `top_k` of {best positive} ∪ candidates (raw scores)."""
    if top_k is None:
        return True
    return 1 + int((candidate_raw > positive_raw.max()).sum()) <= top_k


def kept_by_margin(positive_unit: Tensor, candidate_unit: Tensor, margin: Optional[float]) -> list[int]:
    """Indices of the candidates whose [0, 1] score is below margin × the lowest positive's (all without margin)."""
    if margin is None:
        return list(range(len(candidate_unit)))
    threshold = margin * float(positive_unit.min())
    return [index for index, score in enumerate(candidate_unit.tolist()) if score < threshold]


def teacher_filtered_records(teacher: Any, pools: Sequence[tuple[str, Sequence[str], Sequence[str]]],
                             settings: TeacherFilterSettings, num_negatives: int
                             ) -> tuple[list[Optional[dict]], TeacherFilterReport]:
    """Rescore each (query, positives, candidates) of `pools` with `teacher` and filter (module docstring).

    Returns, per pool in input order, the IR record with `teacher_scores` (None: a query the consistency filter
    dropped), and the report of what each filter removed.
    """
    report = TeacherFilterReport(queries_rescored=len(pools))
    raw_scores = teacher.score_candidates([query for query, _, _ in pools],
                                          [list(positives) + list(candidates) for _, positives, candidates in pools])
    records: list[Optional[dict]] = []
    for (query, positives, candidates), raw in zip(pools, raw_scores):
        report.candidates_rescored += len(candidates)
        positive_raw, candidate_raw = raw[:len(positives)], raw[len(positives):]
        if not is_consistent(positive_raw, candidate_raw, settings.top_k):
            report.queries_removed_by_top_k += 1
            records.append(None)
            continue
        unit = teacher.unit_scores(raw)
        kept = kept_by_margin(unit[:len(positives)], unit[len(positives):], settings.margin)
        report.candidates_removed_by_margin += len(candidates) - len(kept)
        chosen = kept[:num_negatives]
        records.append({"query": query, "positives": list(positives),
                        "negatives": [candidates[index] for index in chosen],
                        "teacher_scores": positive_raw.tolist() + [float(candidate_raw[index]) for index in chosen]})
    return records, report
