"""Hard-negative mining: rank a corpus for every query with an encoder and keep hard, but not too hard,
non-relevant documents as negatives.

For each query the whole corpus is ranked by cosine similarity. A document at 1-based rank `r` is a
candidate when `lo <= r <= hi` (`rank_range`; ranks count every document, relevant ones included),
it is not relevant to the query (not one of its positives by text, not a document judged relevant by id)
and, with a `margin`, its score is below `margin × (lowest positive score)`: a candidate scoring almost
as high as a positive is more likely an unjudged positive than a negative. The first `num_negatives`
candidates in rank order (the hardest) become the query's negatives.

With a teacher (`workflows/teacher_mining.py`) every candidate in the range (not only the first
`num_negatives`) goes to the teacher, which rescores, filters and records its scores; the first `num_negatives`
candidates it keeps become the negatives.

The output is the IR JSON-lines format the trainer reads: `{"query", "positives", "negatives"}`, plus
`teacher_scores` (positives', then negatives' raw teacher scores) with a teacher.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import torch

from codiemb_pl.data.beir import CORPUS_FILE, document_text, is_beir_folder, load_beir_corpus, read_beir_corpus
from codiemb_pl.data.cache.records import opened_records
from codiemb_pl.data.readers import read_json_records, utf8_error
from codiemb_pl.data.sources import SourceConfig
from codiemb_pl.errors import InputError
from codiemb_pl.evaluation.retrieval import rank_corpus
from codiemb_pl.storage.atomic import atomic_write_text
from codiemb_pl.workflows.teacher_mining import TeacherFilterReport, TeacherFilterSettings, teacher_filtered_records


@dataclass(frozen=True)
class MiningQuery:
    """One query to mine for: its positives (texts) and corpus ids that must never become negatives."""

    query: str
    positives: tuple[str, ...]
    relevant_doc_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class MiningSettings:
    """Which ranked documents may become negatives (see the module docstring)."""

    rank_range: tuple[int, int] = (10, 50)
    margin: Optional[float] = 0.95
    num_negatives: int = 4

    def __post_init__(self) -> None:
        low, high = self.rank_range
        if not 1 <= low <= high:
            raise InputError("--range", f"rank range must satisfy 1 <= lo <= hi, got {low} {high}",
                             "e.g. --range 10 50")
        if self.num_negatives < 1:
            raise InputError("--num-negatives", f"must be at least 1, got {self.num_negatives}", "e.g. 4")
        if self.margin is not None and not self.margin > 0:
            raise InputError("--margin", f"must be > 0, got {self.margin}", "e.g. 0.95, or --no-margin")


@dataclass
class MiningResult:
    """Mined records (IR JSON-lines dicts, input order) and how many queries got how many negatives; with a
    teacher, what its filters removed."""

    records: list[dict] = field(default_factory=list)
    teacher_report: Optional[TeacherFilterReport] = None

    @property
    def histogram(self) -> Counter:
        return Counter(len(record["negatives"]) for record in self.records)


def select_negatives(ranked_indices: Sequence[int], ranked_scores: Sequence[float], excluded: set[int],
                     positive_score: float, settings: MiningSettings) -> list[int]:
    """Corpus indices of the negatives of one query, hardest first, from its ranking (best first)."""
    low, high = settings.rank_range
    threshold = None if settings.margin is None else settings.margin * positive_score
    chosen: list[int] = []
    for rank, (index, score) in enumerate(zip(ranked_indices, ranked_scores), start=1):
        if rank > high:
            break
        if rank < low or index in excluded or (threshold is not None and not score < threshold):
            continue
        chosen.append(index)
        if len(chosen) == settings.num_negatives:
            break
    return chosen


def mine_hard_negatives(encoder, queries: Sequence[MiningQuery], corpus: dict[str, str], settings: MiningSettings,
                        batch_size: int = 64, query_prompt: Optional[str] = None,
                        show_progress: bool = False, teacher=None,
                        teacher_filter: TeacherFilterSettings = TeacherFilterSettings()) -> MiningResult:
    """Mine negatives for `queries` from `corpus` (doc id -> text) with a `TextEncoder`; with a `teacher`
    (`model.teacher.load_teacher`), rescore and filter every candidate in the range by `teacher_filter`."""
    if not corpus:
        raise InputError("corpus", "the corpus is empty", "give documents to mine negatives from")
    doc_ids = list(corpus)
    doc_texts = [corpus[doc_id] for doc_id in doc_ids]
    index_of_id = {doc_id: index for index, doc_id in enumerate(doc_ids)}
    indices_of_text: dict[str, list[int]] = {}
    for index, text in enumerate(doc_texts):
        indices_of_text.setdefault(text, []).append(index)

    corpus_emb = encoder.encode(doc_texts, batch_size=batch_size, show_progress=show_progress)
    query_emb = encoder.encode([q.query for q in queries], batch_size=batch_size, prompt=query_prompt or None,
                               show_progress=show_progress)
    outside_positives = sorted({text for q in queries for text in q.positives if text not in indices_of_text})
    outside_emb = encoder.encode(outside_positives, batch_size=batch_size, show_progress=show_progress) \
        if outside_positives else None
    outside_row = {text: row for row, text in enumerate(outside_positives)}

    def positive_embedding(text: str) -> torch.Tensor:
        if text in indices_of_text:
            return corpus_emb[indices_of_text[text][0]]
        return outside_emb[outside_row[text]]

    scores, ranked = rank_corpus(query_emb, corpus_emb, top_k=settings.rank_range[1])
    query_unit = torch.nn.functional.normalize(query_emb, dim=-1)
    result = MiningResult()
    pool_settings = settings if teacher is None else replace(settings, num_negatives=settings.rank_range[1])
    pools = []
    for row, mining_query in enumerate(queries):
        excluded = {index for text in mining_query.positives for index in indices_of_text.get(text, ())}
        excluded.update(index_of_id[doc_id] for doc_id in mining_query.relevant_doc_ids if doc_id in index_of_id)
        positive_emb = torch.nn.functional.normalize(
            torch.stack([positive_embedding(text) for text in mining_query.positives]), dim=-1)
        lowest_positive = float((positive_emb @ query_unit[row]).min())
        chosen = select_negatives(ranked[row].tolist(), scores[row].tolist(), excluded, lowest_positive,
                                  pool_settings)
        pools.append((mining_query.query, mining_query.positives, [doc_texts[index] for index in chosen]))
    if teacher is None:
        result.records = [{"query": query, "positives": list(positives), "negatives": candidates}
                          for query, positives, candidates in pools]
        return result
    records, result.teacher_report = teacher_filtered_records(teacher, pools, teacher_filter, settings.num_negatives)
    result.records = [record for record in records if record is not None]
    return result


# -- inputs ------------------------------------------------------------------------------------------------
def load_beir_mining_set(folder: str | Path, split: str) -> tuple[list[MiningQuery], dict[str, str]]:
    """Judged queries of a BEIR split with a relevant document (their positives), and the corpus.

    Every document judged relevant (score > 0) is excluded from that query's negatives.
    """
    retrieval_set = load_beir_corpus(folder, split)
    queries = []
    for query_id, judgements in retrieval_set.qrels.items():
        relevant = [doc_id for doc_id, relevance in judgements.items() if relevance > 0]
        if relevant:
            queries.append(MiningQuery(query=retrieval_set.queries[query_id],
                                       positives=tuple(retrieval_set.corpus[doc_id] for doc_id in relevant),
                                       relevant_doc_ids=frozenset(relevant)))
    return queries, retrieval_set.corpus


def load_ir_file(path: str | Path) -> tuple[list[MiningQuery], list[str]]:
    """Queries with their positives, and every negative text already there, from an IR file
    (jsonl/csv/tsv/parquet with query + positives [+ negatives]), read as training reads it (its records table)."""
    queries, negatives = [], []
    with opened_records(SourceConfig(name=Path(path).name, task="ir", path=str(path))) as records:
        for row in records.json_rows(range(len(records))):
            queries.append(MiningQuery(query=row["query"], positives=tuple(row["positives"])))
            negatives += row["negatives"]
    return queries, negatives


def corpus_from_queries(queries: Sequence[MiningQuery], extra_texts: Sequence[str] = ()) -> dict[str, str]:
    """A corpus of the queries' own positives (and `extra_texts`), deduplicated, ids `doc0`, `doc1`, ..."""
    texts = list(dict.fromkeys([text for q in queries for text in q.positives] + list(extra_texts)))
    return {f"doc{index}": text for index, text in enumerate(texts)}


def read_corpus(path: str | Path) -> dict[str, str]:
    """doc id -> text from a BEIR folder, a corpus JSON-lines file (`text`, optional `title`, `_id`/`id`)
    or a plain text file (one document per line)."""
    location = Path(path)
    if location.is_dir():
        if not (location / CORPUS_FILE).is_file():
            raise InputError(str(location), f"folder has no {CORPUS_FILE}", "give a BEIR folder or a corpus file")
        return read_beir_corpus(location)
    if not location.is_file():
        raise InputError(str(location), "no such corpus file or folder", "check the --corpus path")
    if location.suffix.lower() in (".jsonl", ".json"):
        corpus: dict[str, str] = {}
        for number, row in enumerate(read_json_records(location)):
            text = row.values.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InputError(row.where, "corpus record has no text", 'write {"_id": ..., "title": ..., "text": ...}')
            doc_id = str(row.values.get("_id", row.values.get("id", number)))
            if doc_id in corpus:
                raise InputError(row.where, f"duplicate document id {doc_id!r}", "ids must be unique")
            corpus[doc_id] = document_text(str(row.values.get("title") or ""), text)
        return corpus
    try:
        content = location.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise utf8_error(location, exc) from exc
    lines = [line.strip() for line in content.splitlines()]
    return {str(number): line for number, line in enumerate(lines) if line}


def load_mining_inputs(data: str | Path, split: Optional[str], corpus_path: Optional[str | Path]
                       ) -> tuple[list[MiningQuery], dict[str, str]]:
    """Queries and corpus: a BEIR folder + split (its corpus unless `corpus_path`), or an IR file with
    `corpus_path` (default: the file's positives and negatives as the corpus)."""
    if Path(data).is_dir():
        if not is_beir_folder(data):
            raise InputError(str(data), "folder is not a BEIR folder (corpus.jsonl, queries.jsonl, qrels/)",
                             "give a BEIR folder or an IR JSON-lines file")
        if not split:
            raise InputError(str(data), "a BEIR folder needs a split", "pass --split train (a qrels/<split>.tsv)")
        queries, corpus = load_beir_mining_set(data, split)
    else:
        queries, known_negatives = load_ir_file(data)
        corpus = corpus_from_queries(queries, known_negatives) if corpus_path is None else {}
    if corpus_path is not None:
        corpus = read_corpus(corpus_path)
    if not queries:
        raise InputError(str(data), "no query with a positive", "every query needs at least one relevant document")
    return queries, corpus


# -- outputs -----------------------------------------------------------------------------------------------
def write_ir_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """Write IR JSON lines atomically (the file appears complete or not at all)."""
    atomic_write_text(path, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))


def format_histogram(histogram: Counter, width: int = 40) -> str:
    """`negatives  queries` lines with a bar per count, fewest negatives first."""
    if not histogram:
        return "no queries"
    most = max(histogram.values())
    lines = ["negatives  queries"]
    for count in sorted(histogram):
        bar = "#" * max(1, round(width * histogram[count] / most))
        lines.append(f"{count:>9}  {histogram[count]:>7}  {bar}")
    return "\n".join(lines)
