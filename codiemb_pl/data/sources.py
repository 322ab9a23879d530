"""Sources: one config per sub-dataset, turned into validated IR or STS records.

A source is a file (jsonl/json, csv, tsv, parquet), a BEIR folder, a Hugging Face dataset (hub id,
local dataset folder/script or `save_to_disk` folder) or a `pkg://` resource. Columns are matched to
our fields by name (common aliases built in, `columns` overrides them); every record is validated
while loading, and bad input raises `InputError` naming the file and line.
"""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

from codiemb_pl.data.beir import is_beir_folder, load_beir_corpus, load_beir_training_records, missing_beir_parts
from codiemb_pl.data.readers import (
    EXTENSION_FORMATS,
    TEXT_CELL_FORMATS,
    Row,
    format_from_extension,
    looks_like_hub_id,
    read_rows,
)
from codiemb_pl.data.records import IRCorpus, IRRecord, STSRecord
from codiemb_pl.errors import InputError
from codiemb_pl.paths import resolve_location

TaskName = Literal["ir", "sts"]
SourceFormat = Literal["auto", "jsonl", "csv", "tsv", "parquet", "hf", "beir"]
TASKS = ("ir", "sts")
FORMATS = ("auto", "jsonl", "csv", "tsv", "parquet", "hf", "beir")

# our field -> column names tried in order when `columns` does not name one
IR_FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "query": ("query", "anchor", "question"),
    "positives": ("positives", "positive", "pos", "document"),
    "negatives": ("negatives", "negative", "neg", "hard_negatives"),
    "teacher_scores": ("teacher_scores",),
}
STS_FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "text1": ("text1", "sentence1", "s1", "text_a"),
    "text2": ("text2", "sentence2", "s2", "text_b"),
    "score": ("score", "label", "similarity", "relevance"),
    "teacher_score": ("teacher_score",),
}
UNIT_SCORE_RANGE = (0.0, 1.0)
DEFAULT_SCORE_RANGE = (0.0, 5.0)
BEIR_TRAINING_SPLIT = "train"
BEIR_EVALUATION_SPLIT = "test"


@dataclass
class SourceConfig:
    """One sub-dataset: where it lives, which task it trains, and how to read it.

    Attributes:
        name: the sub-dataset's name (logs, metrics `val/<name>/...`, the export's prompt names).
        task: `ir` (query, positives, negatives) or `sts` (two texts and a score).
        path: a file, a folder (BEIR, Hugging Face `save_to_disk`), a hub id (`format: hf`) or `pkg://...`.
        format: auto (by extension or folder layout), jsonl, csv, tsv, parquet, hf or beir.
        split: the split to read: default "train" (BEIR evaluation: "test").
        columns: maps our field (IR: query/positives/negatives; STS: text1/text2/score) to the source's column.
        score_range: the STS scale `[lo, hi]`, normalised to [0, 1] (default `[0, 1]` when every score lies
            in it, else `[0, 5]`).
        instruction: the instruction put before queries and STS sentences (`data.instruction_template`).
        batch_size: this sub-dataset's own per-device batch (default `data.ir_batch_size` / `sts_batch_size`).
        max_samples: keep the first n records (after a shuffle when `seed` is set).
        seed: shuffles the records before `max_samples` takes its subset.
        subset: the Hugging Face configuration name (`format: hf`).
    """

    name: str
    task: TaskName
    path: str
    format: SourceFormat = "auto"
    split: Optional[str] = None
    columns: Optional[dict[str, str]] = None
    score_range: Optional[list[float]] = None
    instruction: Optional[str] = None
    batch_size: Optional[int] = None
    max_samples: Optional[int] = None
    seed: Optional[int] = None
    subset: Optional[str] = None

    def __post_init__(self) -> None:
        where = f"source {self.name!r}"
        if self.task not in TASKS:
            raise InputError(where, f"task {self.task!r} is unknown", f"use one of {TASKS}")
        if self.format not in FORMATS:
            raise InputError(where, f"format {self.format!r} is unknown", f"use one of {FORMATS}")
        for field_name in ("batch_size", "max_samples"):
            value = getattr(self, field_name)
            if value is not None and value < 1:
                raise InputError(where, f"{field_name} must be at least 1, got {value}", "leave it unset or use n >= 1")
        if self.columns is not None:
            known = IR_FIELD_ALIASES if self.task == "ir" else STS_FIELD_ALIASES
            unknown = sorted(set(self.columns) - set(known))
            if unknown:
                raise InputError(where, f"columns names unknown field(s) {unknown} for task {self.task!r}",
                                 f"map our fields {sorted(known)} to your columns")
        if self.score_range is not None:
            if self.task != "sts":
                raise InputError(where, "score_range applies to STS sources only", "remove it or set task: sts")
            if len(self.score_range) != 2 or not all(map(math.isfinite, self.score_range)) \
                    or self.score_range[0] >= self.score_range[1]:
                raise InputError(where, f"score_range must be [lo, hi] with lo < hi, got {self.score_range}",
                                 "e.g. score_range: [0, 5]")


def detect_format(cfg: SourceConfig) -> tuple[str, str]:
    """The (resolved location, concrete format) of a source; `auto` picks by what the path is."""
    location = resolve_location(cfg.path)
    if cfg.format != "auto":
        return location, cfg.format
    path = Path(location)
    if path.is_dir():
        return location, "beir" if is_beir_folder(path) else "hf"
    if path.is_file():
        fmt = format_from_extension(path)
        if fmt is None:
            raise InputError(location, f"cannot tell the format from the extension {path.suffix!r}",
                             f"use one of {sorted(EXTENSION_FORMATS)} or set format:")
        return location, fmt
    if looks_like_hub_id(location):
        return location, "hf"
    raise InputError(location, "no such file or folder", "check the path (relative paths start at the working folder)")


def iter_ir_records(cfg: SourceConfig) -> Iterator[IRRecord]:
    """Every record of an IR source, validated one row at a time, in file order (before `max_samples`);
    bad input raises the same `InputError` as reading the whole source first (see `_validated_rows`).
    Training data is read through its records table (`cache.records.open_records`), which streams this when
    the column path is unsure (and for every format but JSON lines)."""
    location, fmt = detect_format(cfg)
    if fmt == "beir":
        _reject_columns_for_beir(cfg, location)
        yield from load_beir_training_records(location, cfg.split or BEIR_TRAINING_SPLIT)
        return
    decode_json = fmt in TEXT_CELL_FORMATS
    yield from _validated_rows(cfg, location, fmt, lambda row: _ir_record(row, cfg.columns, decode_json=decode_json))


def iter_raw_sts_pairs(cfg: SourceConfig) -> Iterator[tuple[str, str, str, Optional[float], Optional[float]]]:
    """(where, text1, text2, raw score, teacher score) of every row of an STS source, validated one row at a
    time; the score range is checked and applied once all scores are known (`score_range_of`). A pair may lack
    a gold score (None) when it has a teacher score (in [0, 1]; None when absent)."""
    if cfg.task != "sts":
        raise InputError(f"source {cfg.name!r}", f"is an {cfg.task!r} source, not STS", "set task: sts")
    location, fmt = detect_format(cfg)
    if fmt == "beir":
        raise InputError(location, "a BEIR folder holds retrieval data, not STS pairs", "set task: ir")
    yield from _validated_rows(cfg, location, fmt, lambda row: _raw_sts_pair(row, cfg.columns))


def load_sts_pairs(cfg: SourceConfig) -> list[STSRecord]:
    """Validated STS pairs with scores normalised to [0, 1] by the source's score range (evaluation sets: every
    pair needs a gold score)."""
    raw_pairs = list(iter_raw_sts_pairs(cfg))
    for where, _, _, score, _ in raw_pairs:
        if score is None:
            raise InputError(where, "pair has a teacher_score but no gold score",
                             "evaluation sets need a gold score for every pair")
    scores = [pair[3] for pair in raw_pairs]
    low, high = score_range_of(cfg, min(scores), max(scores))
    records = []
    for where, text1, text2, score, teacher_score in raw_pairs:
        check_score_in_range(score, low, high, where)
        records.append(STSRecord(text1, text2, (score - low) / (high - low), teacher_score))
    return _subsample(records, cfg)


def check_score_in_range(score: float, low: float, high: float, where: str) -> None:
    if not low <= score <= high:
        raise InputError(where, f"score {score} is outside the score range [{low:g}, {high:g}]",
                         "fix the score or declare the range with score_range: [lo, hi]")


def load_ir_corpus(cfg: SourceConfig) -> IRCorpus:
    """The evaluation retrieval set of a BEIR source (`split` defaults to "test").

    `max_samples` keeps that many judged queries (after a shuffle when `seed` is set); the corpus stays whole.
    """
    location, fmt = detect_format(cfg)
    if fmt != "beir":
        missing = missing_beir_parts(location) if Path(location).is_dir() else ["a folder"]
        raise InputError(location, f"retrieval evaluation needs a BEIR folder (format {fmt!r}; missing {missing})",
                         "point path at a folder with corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    _reject_columns_for_beir(cfg, location)
    # evaluation corpora keep documents with an empty title and text (MTEB does); training data does not
    retrieval_set = load_beir_corpus(location, cfg.split or BEIR_EVALUATION_SPLIT, keep_empty_documents=True)
    kept_ids = _subsample(list(retrieval_set.qrels), cfg)
    if len(kept_ids) == len(retrieval_set.qrels):
        return retrieval_set
    return IRCorpus(queries={qid: retrieval_set.queries[qid] for qid in kept_ids}, corpus=retrieval_set.corpus,
                    qrels={qid: retrieval_set.qrels[qid] for qid in kept_ids})


def _validated_rows(cfg: SourceConfig, location: str, fmt: str, validate: Callable[[Row], Any]) -> Iterator[Any]:
    """`validate(row)` of every row, streamed. Reading errors (malformed JSON, a short CSV row) anywhere in
    the file come before validation errors, and an empty source is an error, as when the whole file is read
    first: after the first invalid row the rest is still read, then that row's error is raised."""
    first_invalid: Optional[InputError] = None
    empty = True
    for row in read_rows(location, fmt, split=cfg.split, subset=cfg.subset):
        empty = False
        if first_invalid is not None:
            continue
        try:
            value = validate(row)
        except InputError as error:
            first_invalid = error
            continue
        yield value
    if empty:
        raise InputError(location, "the source holds no records", "check the file, split and subset")
    if first_invalid is not None:
        raise first_invalid


def _reject_columns_for_beir(cfg: SourceConfig, location: str) -> None:
    if cfg.columns:
        raise InputError(location, "columns does not apply to BEIR folders (their fields are fixed)",
                         "remove columns: from this source")


def _subsample(items: list, cfg: SourceConfig) -> list:
    """The first `max_samples` items, after a seeded shuffle when `seed` is set."""
    return [items[index] for index in subsample_positions(len(items), cfg)]


def subsample_positions(count: int, cfg: SourceConfig) -> list[int]:
    """Positions of the items `max_samples` keeps out of `count`, in order (a seeded shuffle when `seed`
    is set: `random.shuffle` draws depend only on the length, so shuffling positions keeps the same items)."""
    positions = list(range(count))
    if cfg.seed is not None:
        random.Random(cfg.seed).shuffle(positions)
    return positions if cfg.max_samples is None else positions[:cfg.max_samples]


def column_candidates(field: str, aliases: dict[str, tuple[str, ...]],
                      columns: Optional[dict[str, str]]) -> tuple[str, ...]:
    """The source columns that may hold our `field`: the one `columns` maps it to, else its aliases in order."""
    if columns and field in columns:
        return (columns[field],)
    return aliases[field]


def _field_value(row: Row, field: str, candidates: tuple[str, ...], *, required: bool) -> Any:
    for column in candidates:
        if column in row.values:
            return row.values[column]
    if required:
        raise InputError(row.where, f"missing field {field!r} (looked for column {' / '.join(candidates)}); "
                                    f"available columns: {sorted(row.values)}",
                         f"rename the column or map it with columns: {{{field}: <your column>}}")
    return None


def _ir_record(row: Row, columns: Optional[dict[str, str]], decode_json: bool) -> IRRecord:
    def value(field: str, required: bool) -> Any:
        return _field_value(row, field, column_candidates(field, IR_FIELD_ALIASES, columns), required=required)

    query = _single_text(value("query", True), row.where, "query")
    positives = _text_list(value("positives", True), row.where, "positives", decode_json)
    if not positives:
        raise InputError(row.where, "IR record has no positives", "give every query at least one positive passage")
    negatives = _text_list(value("negatives", False), row.where, "negatives", decode_json)
    teacher_scores = _teacher_scores(value("teacher_scores", False), row.where, len(positives), len(negatives),
                                     decode_json)
    return IRRecord(query=query, positives=positives, negatives=negatives, teacher_scores=teacher_scores)


def _raw_sts_pair(row: Row, columns: Optional[dict[str, str]]) -> tuple[str, str, str, Optional[float], Optional[float]]:
    """(where, text1, text2, raw score, teacher score) of one row; the score is normalised once the range is
    known. The gold score may be missing when a teacher score (in [0, 1]) is given."""
    def value(field: str, required: bool = True) -> Any:
        return _field_value(row, field, column_candidates(field, STS_FIELD_ALIASES, columns), required=required)

    text1, text2 = _single_text(value("text1"), row.where, "text1"), _single_text(value("text2"), row.where, "text2")
    teacher = value("teacher_score", False)
    teacher_score = None if _blank(teacher) else _unit_teacher_score(teacher, row.where)
    gold = value("score", teacher_score is None)
    score = None if teacher_score is not None and _blank(gold) else _score(gold, row.where)
    return row.where, text1, text2, score, teacher_score


def _blank(value: Any) -> bool:
    """A missing optional cell: None, or an empty CSV/TSV cell."""
    return value is None or (isinstance(value, str) and not value.strip())


def _teacher_scores(value: Any, where: str, positives: int, negatives: int,
                    decode_json: bool) -> Optional[tuple[float, ...]]:
    """A record's `teacher_scores`: one finite number per positive, then per negative, in their order (SPEC §10);
    None when absent."""
    if _blank(value):
        return None
    if isinstance(value, str) and decode_json:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if not isinstance(value, (list, tuple)):
        raise InputError(where, f"teacher_scores must be a list of numbers, got {type(value).__name__}",
                         "write one score per positive, then per negative, e.g. [0.9, 0.2, 0.1]")
    scores = tuple(_score(item, where, "teacher score") for item in value)
    if len(scores) != positives + negatives:
        raise InputError(where, f"teacher_scores has {len(scores)} scores for {positives} positives + {negatives} "
                                f"negatives", "give one score per positive, then per negative, in their order")
    return scores


def _unit_teacher_score(value: Any, where: str) -> float:
    number = _score(value, where, "teacher_score")
    if not 0.0 <= number <= 1.0:
        raise InputError(where, f"teacher_score {number} is outside [0, 1]",
                         "map teacher scores to [0, 1]: cosines clipped at 0, logits through a sigmoid")
    return number


def _single_text(value: Any, where: str, field: str) -> str:
    if not isinstance(value, str):
        raise InputError(where, f"field {field!r} must be one text, got {type(value).__name__}",
                         "store it as a string")
    if not value.strip():
        raise InputError(where, f"field {field!r} is empty", "remove the record or fill in the text")
    return value


def _text_list(value: Any, where: str, field: str, decode_json: bool) -> tuple[str, ...]:
    """A string or list of strings as a tuple; None, "" and [] give (). In CSV/TSV cells a JSON list is decoded."""
    if isinstance(value, str):
        if not value.strip():
            return ()
        value = _decode_json_list(value) if decode_json else [value]
    elif value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InputError(where, f"field {field!r} must be a text or a list of texts, got {type(value).__name__}",
                         'use "text" or ["text", ...]')
    for item in value:
        if not isinstance(item, str):
            raise InputError(where, f"field {field!r} holds a {type(item).__name__}, not text", "store texts as strings")
        if not item.strip():
            raise InputError(where, f"field {field!r} holds an empty text", "remove the empty entry")
    return tuple(value)


def _decode_json_list(cell: str) -> list:
    """`["a", "b"]` in a cell -> ["a", "b"]; any other cell (including "[sic]") is one text."""
    stripped = cell.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            decoded = json.loads(stripped)
        except json.JSONDecodeError:
            return [cell]
        if isinstance(decoded, list) and all(isinstance(item, str) for item in decoded):
            return decoded
    return [cell]


def _score(value: Any, where: str, what: str = "score") -> float:
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):   # JSON true is not 1.0
        number = float(value)
    else:
        number = None
    if number is None:
        raise InputError(where, f"{what} {value!r} is not a number", f"write the {what} as a number")
    if not math.isfinite(number):
        raise InputError(where, f"{what} is {number}", "give every pair a finite score" if what == "score"
                         else f"give every {what} a finite value")
    return number


def score_range_of(cfg: SourceConfig, lowest: float, highest: float) -> tuple[float, float]:
    """The declared range, else [0, 1] when every score (lowest..highest) lies in it, else [0, 5]."""
    if cfg.score_range is not None:
        return float(cfg.score_range[0]), float(cfg.score_range[1])
    if UNIT_SCORE_RANGE[0] <= lowest and highest <= UNIT_SCORE_RANGE[1]:
        return UNIT_SCORE_RANGE
    return DEFAULT_SCORE_RANGE
