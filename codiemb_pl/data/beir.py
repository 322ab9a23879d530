"""BEIR folders: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
`qrels/<split>.tsv` (`query-id`, `corpus-id`, `score`, header line; ids are strings).

Read with MTEB's conventions: a document's text is `title + " " + text` (the text alone without a
title), only queries with at least one judgement are kept, graded relevance stays an int, and a
relevance of 0 is kept as a judgement without being a hit. A document whose title and text are both
empty is an error in training data; evaluation corpora keep it as an empty string (MTEB encodes it so
and scores the set) and say once how many there are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from codiemb_pl.data.readers import Row, read_json_records, utf8_error
from codiemb_pl.data.records import IRCorpus, IRRecord
from codiemb_pl.errors import InputError

logger = logging.getLogger(__name__)

CORPUS_FILE = "corpus.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_FOLDER = "qrels"


def is_beir_folder(path: str | Path) -> bool:
    """True when `path` is a folder with corpus.jsonl, queries.jsonl and a qrels/ folder."""
    return not missing_beir_parts(path)


def missing_beir_parts(path: str | Path) -> list[str]:
    """The parts of the BEIR layout that `path` lacks (empty when it is a complete BEIR folder)."""
    folder = Path(path)
    if not folder.is_dir():
        return ["the folder itself"]
    required = {CORPUS_FILE: (folder / CORPUS_FILE).is_file(), QUERIES_FILE: (folder / QUERIES_FILE).is_file(),
                QRELS_FOLDER + "/": (folder / QRELS_FOLDER).is_dir()}
    return [name for name, present in required.items() if not present]


def document_text(title: str, text: str) -> str:
    """MTEB's document string: `title + " " + text`, stripped; the text alone when the title is empty."""
    return f"{title} {text}".strip() if title else text.strip()


def read_beir_corpus(folder: str | Path, keep_empty_documents: bool = False) -> dict[str, str]:
    """doc id -> document text; duplicate ids and a missing `text` are errors, and so is a document with an
    empty title and text unless `keep_empty_documents` (evaluation: kept as "", one warning with the count)."""
    path = Path(folder) / CORPUS_FILE
    corpus: dict[str, str] = {}
    empty: list[str] = []
    for doc_id, row in _records_by_id(path, "document"):
        title = _optional_text(row.values.get("title"), row.where, "title")
        text = document_text(title, _required_text(row.values, row.where, "text", allow_empty=True))
        if not text:
            if not keep_empty_documents:
                raise InputError(row.where, f"document {doc_id!r} has an empty title and text",
                                 "remove the document or give it text")
            empty.append(doc_id)
        corpus[doc_id] = text
    if empty:
        logger.warning(f"[codiemb] {path}: {len(empty)} document(s) with an empty title and text (first: "
                       f"{empty[0]!r}) kept as empty strings for evaluation, as MTEB does")
    return corpus


def read_beir_queries(folder: str | Path) -> dict[str, str]:
    """query id -> query text; duplicate ids and empty queries are errors."""
    return {query_id: _required_text(row.values, row.where, "text", allow_empty=False)
            for query_id, row in _records_by_id(Path(folder) / QUERIES_FILE, "query")}


def _records_by_id(path: Path, kind: str) -> Iterator[tuple[str, Row]]:
    """(id, row) of every record of a BEIR JSON-lines file; a missing or repeated `_id` is an error."""
    first_seen: dict[str, str] = {}
    for row in read_json_records(path):
        record_id = _record_id(row.values, row.where)
        _reject_duplicate(record_id, row.where, first_seen, kind)
        yield record_id, row


def read_beir_qrels(folder: str | Path, split: str, query_ids: set[str] | dict[str, str],
                    doc_ids: set[str] | dict[str, str]) -> dict[str, dict[str, int]]:
    """qid -> {doc id: relevance} from `qrels/<split>.tsv`, in file order; unknown ids are errors."""
    path = Path(folder) / QRELS_FOLDER / f"{split}.tsv"
    if not path.is_file():
        available = sorted(p.stem for p in (Path(folder) / QRELS_FOLDER).glob("*.tsv"))
        raise InputError(str(path), f"no qrels for split {split!r}; available splits: {available}",
                         "set split: to one of them")
    qrels: dict[str, dict[str, int]] = {}
    try:
        _read_qrels_lines(path, query_ids, doc_ids, qrels)
    except UnicodeDecodeError as exc:
        raise utf8_error(path, exc) from exc
    if not qrels:
        raise InputError(str(path), "no judgements", "add query-id/corpus-id/score rows")
    return qrels


def _read_qrels_lines(path: Path, query_ids: set[str] | dict[str, str], doc_ids: set[str] | dict[str, str],
                      qrels: dict[str, dict[str, int]]) -> None:
    with path.open(encoding="utf-8-sig") as handle:
        for line_number, line in enumerate(handle, start=1):
            where = f"{path}:{line_number}"
            cells = line.rstrip("\r\n").split("\t")
            if not line.strip():
                continue
            if len(cells) != 3:
                raise InputError(where, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(cells)}",
                                 "fix the row")
            query_id, doc_id, score_cell = (cell.strip() for cell in cells)
            if line_number == 1 and not _is_number(score_cell):
                continue  # header line
            if query_id not in query_ids:
                raise InputError(where, f"query id {query_id!r} is not in {QUERIES_FILE}",
                                 "add the query or remove the judgement")
            if doc_id not in doc_ids:
                raise InputError(where, f"corpus id {doc_id!r} is not in {CORPUS_FILE}",
                                 "add the document or remove the judgement")
            qrels.setdefault(query_id, {})[doc_id] = _relevance(score_cell, where)


def load_beir_corpus(folder: str | Path, split: str, keep_empty_documents: bool = False) -> IRCorpus:
    """The retrieval set of one split: judged queries, the full corpus and the split's qrels
    (`keep_empty_documents`: see `read_beir_corpus`; evaluation sets keep them, training data does not)."""
    corpus = read_beir_corpus(folder, keep_empty_documents)
    queries = read_beir_queries(folder)
    qrels = read_beir_qrels(folder, split, queries, corpus)
    return IRCorpus(queries={qid: queries[qid] for qid in qrels}, corpus=corpus, qrels=qrels)


def load_beir_training_records(folder: str | Path, split: str) -> list[IRRecord]:
    """One IRRecord per judged query (qrels order) with its relevance > 0 documents as positives.

    Queries whose judgements are all 0 have no positive and are left out; BEIR gives no hard negatives.
    """
    retrieval_set = load_beir_corpus(folder, split)
    records = []
    for query_id, judgements in retrieval_set.qrels.items():
        positives = tuple(retrieval_set.corpus[doc_id] for doc_id, relevance in judgements.items() if relevance > 0)
        if positives:
            records.append(IRRecord(query=retrieval_set.queries[query_id], positives=positives))
    if not records:
        raise InputError(str(Path(folder) / QRELS_FOLDER / f"{split}.tsv"), "no judgement has relevance > 0",
                         "training needs at least one relevant document per query")
    return records


def _record_id(values: dict, where: str) -> str:
    if "_id" not in values or values["_id"] is None or str(values["_id"]).strip() == "":
        raise InputError(where, f"missing '_id'; available fields: {sorted(values)}", "give every record an _id")
    return str(values["_id"]).strip()


def _reject_duplicate(record_id: str, where: str, first_seen: dict[str, str], kind: str) -> None:
    if record_id in first_seen:
        raise InputError(where, f"duplicate {kind} id {record_id!r} (first at {first_seen[record_id]})",
                         "ids must be unique")
    first_seen[record_id] = where


def _required_text(values: dict, where: str, field: str, *, allow_empty: bool) -> str:
    if field not in values:
        raise InputError(where, f"missing field {field!r}; available fields: {sorted(values)}",
                         f"add a {field!r} field")
    text = _optional_text(values[field], where, field)
    if not allow_empty and not text.strip():
        raise InputError(where, f"field {field!r} is empty", "remove the record or fill in the text")
    return text


def _optional_text(value: object, where: str, field: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InputError(where, f"field {field!r} must be text, got {type(value).__name__}", "store it as a string")
    return value


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _relevance(cell: str, where: str) -> int:
    try:
        value = float(cell)
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise InputError(where, f"relevance {cell!r} is not an integer", "write graded relevance as 0, 1, 2, ...")
    return int(value)
